"""Decode speed of quantcal exports against onnxruntime-genai, side by side in one process.

Each round decodes NEW tokens greedily after a 16-token prompt, at batch 1, with quantcal's
plain runner (shared KV cache, argmax on the device), quantcal's CUDA-graph runner (what
`quantcal bench` and `quantcal generate` use on CUDA) and onnxruntime-genai's generator on
its own export of the same weights; rounds alternate so that clock and thermal drift hit
all three alike. Only the decode loop is timed.

    python -m onnxruntime_genai.models.builder -m HF_FOLDER -o genai-int4 -p int4 -e cuda
    python examples/bench_vs_genai.py run/int4.onnx genai-int4 [--rounds 7] [--new-tokens 128]

Needs a GPU, onnxruntime-gpu and onnxruntime-genai-cuda (see ../shared/ASSETS.md).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import numpy as np

from quantcal.graphrunner import GraphRunner, decoding_runner
from quantcal.runner import DecoderRunner
from quantcal.session import make_session


def _ours(runner: DecoderRunner, prompt: np.ndarray, new: int) -> float:
    logits = runner.prefill(prompt, host_logits=False, cache_length=prompt.shape[1] + new)
    start = time.perf_counter()
    for _ in range(new):
        logits = runner.decode_step(runner.next_tokens(logits), host_logits=False)
    return new / (time.perf_counter() - start)


def _genai(og, model, prompt: np.ndarray, new: int) -> float:
    params = og.GeneratorParams(model)
    length = prompt.shape[1] + new + 1
    params.set_search_options(max_length=length, min_length=length, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt[0].astype(np.int32))
    start = time.perf_counter()
    for _ in range(new):
        generator.generate_next_token()
    return new / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("onnx", help="a quantcal export (model.onnx)")
    parser.add_argument("genai", help="an onnxruntime-genai model folder")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    import onnxruntime_genai as og

    plain = DecoderRunner(*make_session(args.onnx, "cuda"))
    graph = decoding_runner(args.onnx, "cuda")
    if plain.provider != "cuda" or not isinstance(graph, GraphRunner):
        raise SystemExit("needs the CUDA provider and an export with a shared KV cache")
    genai = og.Model(args.genai)
    rng = np.random.default_rng(0)
    runs = {"quantcal": lambda p: _ours(plain, p, args.new_tokens),
            "quantcal + CUDA graph": lambda p: _ours(graph, p, args.new_tokens),
            "onnxruntime-genai": lambda p: _genai(og, genai, p, args.new_tokens)}
    for run in runs.values():  # warm-up: kernels, arenas, graph capture
        run(rng.integers(3, 1000, (1, 16)))
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    gc.disable()
    try:
        for _ in range(args.rounds):
            prompt = rng.integers(3, 1000, (1, 16))
            for name, run in runs.items():
                speeds[name].append(run(prompt))
    finally:
        gc.enable()
    print(f"decode tokens/s, batch 1, {args.new_tokens} new tokens, {args.rounds} rounds")
    for name, values in speeds.items():
        print(f"  {name:24} best {max(values):7.1f}  median {statistics.median(values):7.1f}")


if __name__ == "__main__":
    main()
