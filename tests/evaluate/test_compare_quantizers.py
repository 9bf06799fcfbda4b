"""examples/compare_quantizers.py on a tiny random Llama with the shipped tests/data: every
row is in the table and in compare.json, and one row's KL and perplexity agree with a
computation here (the ONNX model through tinymodels.OnnxDecoder, the FP model through HF,
KL and NLL in numpy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from quantcal.evaluate.tasks import get_task
from tinymodels import OnnxDecoder

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "compare_quantizers.py"
DATA = REPO / "tests" / "data"
SEQ, WINDOWS = 32, 3
UNIFORM = ("int4-g128", "int4-g64", "int8")
QUANTCAL = ([f"quantcal-{m} {f}" for m in ("rtn", "clip", "awq") for f in UNIFORM]
            + ["quantcal-awq mixed@int4-g64"] + [f"quantcal-gptq {f}" for f in UNIFORM])
ORT = ["ort-rtn int4-g128", "ort-rtn int4-g64", "ort-rtn int4-g128-sym", "ort-rtn int8",
       "ort-hqq int4-g128", "ort-k_quant int4-g128", "ort-gptq int4-g128"]
MUST_RUN = [n for n in QUANTCAL if "gptq" not in n] + ORT[:5]  # the rest may fail, as rows


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny random Llama, hidden 128: int4-g128 is smaller than int4-g64 there."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama-128")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)).save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def compared(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tiny_dir), "--samples", "4", "--seq-len",
         str(SEQ), "--batch-size", "2", "--sensitivity-samples", "2", "--eval-windows",
         str(WINDOWS), "--out", str(out)],
        capture_output=True, text=True, cwd=out, timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res.stdout, json.loads((out / "compare.json").read_text())


def test_every_row_is_in_the_table(compared):
    out, stdout, report = compared
    rows = {r["name"]: r for r in report["rows"]}
    llmc = [n for n in rows if n.startswith("llmc-")]
    assert list(rows) == ["fp (torch)", "fp16 plan (onnx)"] + QUANTCAL + ORT + llmc
    for name in rows:
        assert name in stdout
    for name in MUST_RUN:
        assert not rows[name]["error"], (name, rows[name]["error"])
        assert rows[name]["kl"] > 0 and rows[name]["bytes"] > 0
    assert report["windows"] == {"wikitext2": WINDOWS, "c4": WINDOWS}
    assert (out / "compare.png").stat().st_size > 10_000

    fp = rows["fp16 plan (onnx)"]
    assert fp["kl"] < 1e-6 and fp["bytes"] == rows["fp (torch)"]["bytes"]
    size = {f: rows[f"quantcal-rtn {f}"]["bytes"] for f in ("int4-g128", "int4-g64", "int8")}
    assert size["int4-g128"] < size["int4-g64"] < size["int8"] < fp["bytes"]
    assert rows["quantcal-awq mixed@int4-g64"]["bytes"] <= size["int4-g64"]
    for method in ("rtn", "clip", "awq"):
        assert rows[f"quantcal-{method} int8"]["kl"] < rows[f"quantcal-{method} int4-g128"]["kl"]
    # one RTN, two implementations: quantcal's and onnxruntime's, the same size and error
    ours, theirs = rows["quantcal-rtn int4-g64"], rows["ort-rtn int4-g64"]
    assert ours["bytes"] == theirs["bytes"]
    assert ours["kl"] == pytest.approx(theirs["kl"], rel=0.05)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_one_row_recomputed_here(compared, tiny_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    _, _, report = compared
    row = next(r for r in report["rows"] if r["name"] == "quantcal-rtn int4-g128")
    onnx_model = OnnxDecoder(row["path"])
    fp = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    kl_sum = tokens_all = 0.0
    for corpus in ("wikitext2", "c4"):
        windows = get_task(corpus, seq_len=SEQ, stride=SEQ).load(DATA, limit=WINDOWS,
                                                                  tokenizer=tiny_tokenizer)
        nll = nll_fp = tokens = 0.0
        for w in windows:
            ids = np.asarray([w.input_ids], dtype=np.int64)
            got, _ = onnx_model.run(ids)
            with torch.no_grad():
                ref = fp(torch.from_numpy(ids)).logits.numpy()
            s = w.score_from
            logq, logp = _log_softmax(got[0, s - 1:-1]), _log_softmax(ref[0, s - 1:-1])
            target = np.asarray(w.input_ids[s:])
            nll -= logq[np.arange(len(target)), target].sum()
            nll_fp -= logp[np.arange(len(target)), target].sum()
            kl_sum += (np.exp(logp) * (logp - logq)).sum()
            tokens += len(target)
        assert row["ppl"][corpus] == pytest.approx(np.exp(nll / tokens), rel=1e-5)
        assert row["dnll"][corpus] == pytest.approx((nll - nll_fp) / tokens, rel=1e-3,
                                                    abs=1e-7)
        tokens_all += tokens
    assert row["kl"] == pytest.approx(kl_sum / tokens_all, rel=1e-3)
