"""End-to-end walkthrough on a local model folder and local data.

    python examples/end_to_end.py [--model DIR] [--data FILE] [--run DIR]

Without --model it builds a tiny random Llama (weights + a tokenizer trained on the C4
sample) in a temporary folder, so it runs anywhere in seconds. With --model, point it at
any local Hugging Face causal-LM folder (e.g. the SmolLM2-135M build of shared/ASSETS.md).

What it does (it grows with each stage):
  1. quantcal calibrate: statistics, qparams, sensitivity and a plan from the local C4
     sample into --run;
  2. reads the run directory back and, for one layer, packs its calibrated int4-g128 and
     int8 qparams in onnxruntime's MatMulNBits layout, runs that layer through onnxruntime
     and checks it against the torch reference;
  3. quantcal export (verified against torch), quantcal generate, quantcal eval against the
     FP baseline on local HellaSwag and WikiText-2, and quantcal report.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from quantcal.calibrate.qparams import QPARAMS_KIND
from quantcal.fakequant import layer_qparams
from quantcal.formats import Int4, Int8
from quantcal.packing import dequantize_matmulnbits, pack_matmulnbits
from quantcal.qmath import quantize_weight
from quantcal.rundir import QPARAMS, RunDir

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "c4" / "c4_validation_2k.jsonl.gz"


def build_tiny_model(out: Path, data: Path) -> Path:
    """A tiny random Llama and a BPE tokenizer trained on the first C4 documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    with gzip.open(data, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(300), f)]
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
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def matmulnbits_check(name: str, weight: torch.Tensor, fmt, qp: dict) -> float:
    """Quantize ``weight`` with its calibrated qparams ``qp``, run it as one MatMulNBits
    node in onnxruntime, and return the max |error| against the torch reference."""
    scale, zero = qp["scale"], qp["zero"]
    q = qp.get("codes", quantize_weight(weight, scale, zero, fmt.bits, fmt.group_size))
    packed = pack_matmulnbits(q, scale, zero, fmt.bits, fmt.group_size)
    node = helper.make_node("MatMulNBits", ["A", "B", "scales", "zero_points"], ["Y"],
                            domain="com.microsoft", K=packed.K, N=packed.N, bits=packed.bits,
                            block_size=packed.block_size)
    graph = helper.make_graph(
        [node], name, [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, packed.K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, packed.N])],
        [numpy_helper.from_array(t.numpy(), n) for n, t in
         (("B", packed.B), ("scales", packed.scales), ("zero_points", packed.zero_points))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(1, packed.K)
    (y,) = sess.run(None, {"A": x.numpy()})
    ref = x @ dequantize_matmulnbits(packed).T
    return float(np.abs(y - ref.numpy()).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="local HF model folder (default: tiny)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="calibration text")
    parser.add_argument("--run", type=Path, help="run directory (default: a temporary one)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_tiny_model(Path(tmp) / "tiny-llama", args.data)
        run = args.run or Path(tmp) / "run"
        _run(["quantcal", "calibrate", "--model", str(model_dir), "--data", str(args.data),
              "--samples", str(args.samples), "--seq-len", str(args.seq_len),
              "--formats", "int8,int4-g128,int4-g32", "--sensitivity-samples", "4",
              "--run", str(run), "--device", "cpu", "--overwrite"])
        qparams, _ = RunDir(run).load_tensors(QPARAMS, QPARAMS_KIND)

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        print(f"model {model_dir}: {len(linears)} linear layers")
        name, layer = linears[0]
        for fmt in (Int4(128), Int8()):
            qp = layer_qparams(qparams, name, fmt)
            err = matmulnbits_check(name, layer.weight.detach(), fmt, qp)
            print(f"  {name} as {fmt.name}: onnxruntime MatMulNBits vs torch reference, "
                  f"max |diff| = {err:.2e}")
            assert err < 1e-4

        env = {**os.environ, "QUANTCAL_DATA_DIR": str(args.data.parent.parent)}
        _run(["quantcal", "export", "--provider", "cpu", "--run", str(run)])
        _run(["quantcal", "generate", "--run", str(run), "--provider", "cpu", "--prompt",
              "The weather today is", "--max-new-tokens", "20"])
        _run(["quantcal", "eval", "--run", str(run), "--provider", "cpu", "--tasks",
              "hellaswag,wikitext2", "--limit", "20", "--baseline"], env=env)
        _run(["quantcal", "report", "--run", str(run)])
        if args.run:
            print(f"report: {run / 'report.md'}")


def _run(cmd: list[str], env: dict | None = None) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


if __name__ == "__main__":
    main()
