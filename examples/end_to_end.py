"""The whole pipeline end to end: calibrate, plan, export, generate, eval and report.

    python examples/end_to_end.py [--out DIR] [--model MODEL] [--provider cpu|cuda]

Without --model it builds a tiny random Llama from a config (its tokenizer trained on the
C4 sample packaged with quantcal) and needs nothing beside the clone: it runs with the hub
off, so `--data c4` calibrates on the packaged C4 sample (said in one line, recorded in
run.json), HellaSwag, GSM8K and WikiText-2 come from the repo's small samples in
tests/data, and C4 perplexity from the packaged sample's other half. A few minutes on two
CPU cores. A random model writes gibberish and scores at chance: that is by design, the
point is the pipeline and its report.

With --model (a hub id such as HuggingFaceTB/SmolLM2-135M, or a local HF folder) the same
steps run on a real model with the hub as the data source (or --data-dir DIR, a folder
laid out like shared/data); raise --samples, --seq-len and --limit for real figures.

Everything goes to --out (default ./quantcal-example), which is kept: OUT/run is the run
directory (run.json, plan.json, model.onnx, eval.json, report.md), OUT/tiny-llama the
tiny model.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE_TASKS = REPO / "tests" / "data"  # small HellaSwag, GSM8K, WikiText-2 (and C4) samples
GIBBERISH = ("note: the tiny model's weights are random, so it writes gibberish and scores at "
             "chance, by design: this run shows the pipeline, not a model (see --model)")


def build_tiny_model(out: Path) -> Path:
    """A tiny random Llama and a 512-token BPE tokenizer trained on the packaged C4 sample."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from quantcal.textdata import PACKAGED_C4

    with gzip.open(PACKAGED_C4, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                            bos_token="<|endoftext|>").save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, bos_token_id=0, eos_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="hub id or local HF folder (default: a tiny random "
                                        "Llama built here)")
    parser.add_argument("--out", type=Path, default=Path("quantcal-example"),
                        help="folder for the run directory (and the tiny model); kept")
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--samples", type=int, default=16, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=128, help="calibration window length")
    parser.add_argument("--limit", type=int, default=5, help="documents scored per task")
    parser.add_argument("--data-dir", type=Path, help="task data folder (default: tests/data "
                                                      "for the tiny model, else the hub)")
    parser.error = lambda message: parser.exit(2, f"end_to_end.py: error: {message}\n")
    args = parser.parse_args()
    for flag in ("samples", "seq_len", "limit"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; name a folder")
    if args.data_dir is not None and not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a folder")
    return args


def main() -> None:
    args = parse_args()
    tiny = args.model is None
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = str(out / "run")
    env = dict(os.environ)
    if tiny:
        env["HF_HUB_OFFLINE"] = "1"  # nothing beside the clone: no hub, no download
        print(f"building a tiny random Llama in {out / 'tiny-llama'}", flush=True)
        model = str(build_tiny_model(out / "tiny-llama"))
    else:
        model = args.model
    data_dir = args.data_dir or (SAMPLE_TASKS if tiny else None)
    device = "cuda" if args.provider == "cuda" else "cpu"
    common = ["--run", run, "--provider", args.provider]

    _quantcal(["calibrate", "--model", model, "--data", "c4", "--samples", str(args.samples),
               "--seq-len", str(args.seq_len), "--formats", "int8,int4-g128,int4-g32",
               "--sensitivity-samples", "4", "--target-bits", "6", "--device", device,
               "--run", run, "--overwrite"], env)
    _quantcal(["plan", "--run", run, "--target-bits", "5"], env)
    _quantcal(["export", *common], env)
    sampled = ["--temperature", "1", "--seed", "0"] if tiny else []  # greedy stops at once
    _quantcal(["generate", *common, "--prompt", "The weather today is",
               "--max-new-tokens", "20", *sampled], env)
    if tiny:
        print(GIBBERISH, flush=True)
    limit = ["--limit", str(args.limit), "--baseline", "--device", device]
    tasks_dir = ["--data-dir", str(data_dir)] if data_dir else []
    _quantcal(["eval", *common, "--tasks", "hellaswag,gsm8k,wikitext2", *limit, *tasks_dir],
              env)
    # C4 perplexity on the half of the C4 text that calibration did not read
    _quantcal(["eval", *common, "--tasks", "c4", *limit, *([] if tiny else tasks_dir)], env)
    _quantcal(["report", "--run", run], env)
    if tiny:
        print(GIBBERISH, flush=True)
    print(f"report: {out / 'run' / 'report.md'} (run directory {run}, kept)")


def _quantcal(argv: list[str], env: dict[str, str]) -> None:
    print("$ quantcal " + " ".join(argv), flush=True)
    res = subprocess.run([sys.executable, "-m", "quantcal", *argv], env=env)
    if res.returncode:
        sys.exit(res.returncode)


if __name__ == "__main__":
    main()
