"""Prefill and decode speed of a quantcal export against onnxruntime-genai, in one process.

Contenders, each on its own sessions in the same process:

- quantcal's plain runner (shared KV cache, greedy argmax on the device) and, on CUDA, its
  CUDA-graph runner (what `quantcal bench` and `quantcal generate` use there);
- onnxruntime-genai on the genai folder; on CUDA twice, with the CUDA provider option
  ``enable_cuda_graph`` "0" and "1", each from an edited copy of genai_config.json beside
  links to the folder's other files (the folder itself is left as it is). On CPU once,
  with no CUDA option.

Per batch size (default 1 and 8) each round times, for every contender: prefill (a
``--prompt-len`` prompt through the model until the next token of each row is on the host)
and decode (``--new-tokens`` model steps, greedy, after a 16-token prompt whose prefill is
not timed). Contenders alternate within a round (their order rotating from round to round)
so that clock and thermal drift hit all alike; a first round (kernels, arenas, graph
capture) is not counted. Printed: the median tokens/s (and best) of each contender and the
ratio quantcal / genai of the medians for each pair; a contender that fails at a batch size
(its error printed) is left out of that batch's later rounds and ratios.

    python -m onnxruntime_genai.models.builder -m HF_FOLDER -o genai-int4 -p int4 -e cuda
    python examples/bench_vs_genai.py run/model.onnx genai-int4 [--rounds 7] [--batch 1,8]

The first argument is a quantcal export (its folder is a genai model too: passing it as the
second argument compares the two runtimes on the very same graph). Needs
onnxruntime-genai (``pip install quantcal[genai]``); on a GPU, onnxruntime-gpu and
onnxruntime-genai-cuda (see ../shared/ASSETS.md). :func:`run` and :func:`format_results`
are importable (the tests run them on CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from quantcal.graphrunner import GraphRunner, decoding_runner
from quantcal.runner import DecoderRunner
from quantcal.session import make_session

GENAI_CONFIG = "genai_config.json"
DECODE_PROMPT = 16  # tokens prefilled (untimed) before the timed decode steps
PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class Contender:
    """One runtime configuration: ``prefill(prompt)`` and ``decode(prompt, new)`` return the
    seconds they timed."""

    name: str
    side: str  # quantcal | genai
    prefill: Callable[[np.ndarray], float]
    decode: Callable[[np.ndarray, int], float]


def genai_copy(folder: Path, out: Path, provider: str, cuda_graph: bool) -> Path:
    """``out``: links to ``folder``'s files and its genai_config.json edited so that genai
    runs on ``provider`` (CUDA with ``enable_cuda_graph`` "1" or "0"; CPU with no provider
    options)."""
    out.mkdir(parents=True)
    for path in Path(folder).iterdir():
        if path.name != GENAI_CONFIG:
            (out / path.name).symlink_to(path.resolve())
    config = json.loads((Path(folder) / GENAI_CONFIG).read_text(encoding="utf-8"))
    session = config["model"]["decoder"].setdefault("session_options", {})
    others = [o for o in session.get("provider_options", []) if "cuda" not in o]
    if provider == "cuda":
        cuda = next((o["cuda"] for o in session.get("provider_options", []) if "cuda" in o), {})
        others.insert(0, {"cuda": {**cuda, "enable_cuda_graph": str(int(cuda_graph))}})
    session["provider_options"] = others if provider == "cuda" else []
    (out / GENAI_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


def _ours(runner: DecoderRunner) -> tuple[Callable, Callable]:
    def prefill(prompt: np.ndarray) -> float:
        start = time.perf_counter()
        logits = runner.prefill(prompt, host_logits=False, cache_length=prompt.shape[1] + 1,
                                last_logits=True)
        runner.next_tokens(logits)
        return time.perf_counter() - start

    def decode(prompt: np.ndarray, new: int) -> float:
        logits = runner.prefill(prompt, host_logits=False, cache_length=prompt.shape[1] + new,
                                last_logits=True)
        start = time.perf_counter()
        for _ in runner.greedy(logits, new + 1):  # the first picks from the prefill
            pass
        return time.perf_counter() - start

    return prefill, decode


def _genai(og, model) -> tuple[Callable, Callable]:
    def generator(prompt: np.ndarray, length: int):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=length, min_length=length, do_sample=False,
                                  batch_size=prompt.shape[0])
        return og.Generator(model, params)

    def prefill(prompt: np.ndarray) -> float:
        gen = generator(prompt, prompt.shape[1] + 1)  # its cache: allocated before the clock
        start = time.perf_counter()
        gen.append_tokens(prompt.astype(np.int32))
        gen.generate_next_token()  # picks from the prompt's logits: no model step
        return time.perf_counter() - start

    def decode(prompt: np.ndarray, new: int) -> float:
        gen = generator(prompt, prompt.shape[1] + new + 1)
        gen.append_tokens(prompt.astype(np.int32))
        start = time.perf_counter()
        for _ in range(new + 1):  # the first picks from the prefill: new model steps in all
            gen.generate_next_token()
        return time.perf_counter() - start

    return prefill, decode


def contenders(onnx: Path, genai_folder: Path, provider: str, workdir: Path
               ) -> tuple[list[Contender], int]:
    """quantcal's runners and genai's models (graph on and off on CUDA), and the vocabulary
    size prompts may draw from."""
    import onnxruntime_genai as og

    plain = DecoderRunner(*make_session(onnx, provider))
    if plain.provider != provider or not plain.shares_cache:
        raise SystemExit(f"needs the {provider} provider and an export with a shared KV cache "
                         f"(got {plain.provider}); re-export with this quantcal")
    out = [Contender("quantcal", "quantcal", *_ours(plain))]
    if provider == "cuda":
        graph = decoding_runner(onnx, "cuda")
        if not isinstance(graph, GraphRunner):
            raise SystemExit("the CUDA-graph runner could not be made for this export")
        out.append(Contender("quantcal + CUDA graph", "quantcal", *_ours(graph)))
    for graph_on in ((False, True) if provider == "cuda" else (False,)):
        name = "genai" + ((", CUDA graph on" if graph_on else ", CUDA graph off")
                          if provider == "cuda" else "")
        folder = genai_copy(genai_folder, workdir / f"genai-{int(graph_on)}", provider,
                            graph_on)
        out.append(Contender(name, "genai", *_genai(og, og.Model(str(folder)))))
    return out, min(plain.spec.vocab_size or 1000, 32000)


def measure(runs: list[Contender], *, batches=(1, 8), prompt_len: int = 1024,
            new_tokens: int = 128, rounds: int = 7, vocab: int = 1000, seed: int = 0
            ) -> tuple[dict[tuple[str, int], dict[str, list[float]]], dict]:
    """Tokens/s per (phase, batch) and contender, one value per counted round; and the
    error of each (contender, batch) that failed (it is not run again)."""
    rng = np.random.default_rng(seed)
    speeds = {(p, b): {c.name: [] for c in runs} for p in PHASES for b in batches}
    failed: dict[tuple[str, int], str] = {}
    gc.disable()  # a collection inside a timed loop is noise, not the runtime's speed
    try:
        for r in range(rounds + 1):  # round 0 warms up
            order = runs[r % len(runs):] + runs[:r % len(runs)]
            for b in batches:
                long = rng.integers(3, vocab, (b, prompt_len))
                short = rng.integers(3, vocab, (b, DECODE_PROMPT))
                for c in (c for c in order if (c.name, b) not in failed):
                    try:
                        t_prefill = c.prefill(long)
                        t_decode = c.decode(short, new_tokens)
                    except Exception as exc:  # onnxruntime's and genai's own error types
                        failed[c.name, b] = " ".join(str(exc).split())[:200]
                        continue
                    if r:
                        speeds["prefill", b][c.name].append(b * prompt_len / t_prefill)
                        speeds["decode", b][c.name].append(b * new_tokens / t_decode)
    finally:
        gc.enable()
    return speeds, failed


def run(onnx: str | Path, genai_folder: str | Path, *, provider: str = "cuda",
        batches=(1, 8), prompt_len: int = 1024, new_tokens: int = 128, rounds: int = 7,
        seed: int = 0) -> tuple[list[Contender], dict, dict]:
    """Build the contenders and measure them: contenders, speeds and failures (see
    :func:`measure`)."""
    with tempfile.TemporaryDirectory(prefix="bench-vs-genai-") as tmp:
        runs, vocab = contenders(Path(onnx), Path(genai_folder), provider, Path(tmp))
        speeds, failed = measure(runs, batches=batches, prompt_len=prompt_len,
                                 new_tokens=new_tokens, rounds=rounds, vocab=vocab, seed=seed)
    return runs, speeds, failed


def ratios(runs: list[Contender], by_name: dict[str, list[float]]) -> dict[tuple, float]:
    """median(quantcal contender) / median(genai contender), for every pair measured."""
    med = {name: statistics.median(v) for name, v in by_name.items() if v}
    return {(q.name, g.name): med[q.name] / med[g.name] for q in runs if q.name in med
            and q.side == "quantcal" for g in runs if g.name in med and g.side == "genai"}


def format_results(runs: list[Contender], speeds: dict, *, prompt_len: int, new_tokens: int,
                   rounds: int, failed: dict | None = None) -> str:
    lines, failed = [], failed or {}
    for (phase, batch), by_name in speeds.items():
        what = (f"prefill of {prompt_len} tokens" if phase == "prefill" else
                f"decode, {new_tokens} steps after a {DECODE_PROMPT}-token prompt")
        lines.append(f"{what}, batch {batch}: tokens/s, median of {rounds} rounds (best)")
        for name, values in by_name.items():
            lines.append(f"  {name:26} {statistics.median(values):12,.1f}  "
                         f"({max(values):,.1f})" if values else
                         f"  {name:26} failed: {failed.get((name, batch), 'no rounds')}")
        for (q, g), ratio in ratios(runs, by_name).items():
            lines.append(f"  ratio {q} / {g}: {ratio:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("onnx", help="a quantcal export (model.onnx)")
    parser.add_argument("genai", help="an onnxruntime-genai model folder")
    parser.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    batches = tuple(int(b) for b in args.batch.split(","))
    if min(batches + (args.prompt_len, args.new_tokens, args.rounds)) < 1:
        parser.error("--batch, --prompt-len, --new-tokens and --rounds must be at least 1")
    runs, speeds, failed = run(args.onnx, args.genai, provider=args.provider,
                               batches=batches, prompt_len=args.prompt_len,
                               new_tokens=args.new_tokens, rounds=args.rounds)
    print(format_results(runs, speeds, prompt_len=args.prompt_len,
                         new_tokens=args.new_tokens, rounds=args.rounds, failed=failed))


if __name__ == "__main__":
    main()
