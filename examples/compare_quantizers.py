"""Accuracy per byte: quantcal's weight quantizers against onnxruntime's and llm-compressor's,
all scored by one evaluator.

    python examples/compare_quantizers.py --model MODEL [--data c4] [--data-dir DIR]
        [--samples 128] [--seq-len 512] [--eval-windows 16] [--group 128] [--out DIR]

MODEL: a local HF folder or hub id. ``--data c4`` with ``--data-dir`` (laid out like
shared/data; default tests/data) calibrates on the first half of its C4 sample; scores read
the other half and WikiText-2 test. Every calibrating method sees the same windows (quantcal's
first run's, from its run.json). Rows (a method that fails is a row with its error):

- quantcal through its calibrate/export API, one run per entry of ``QUANTCAL`` (rtn, the
  aware clip search, --awq then the clip search, --hessian GPTQ: the extension point), each
  exporting a uniform plan per format of ``UNIFORM`` (every linear layer; embedding fp16);
  the awq run also a mixed plan from its exact sensitivity at the size of ``MIXED_AT``.
- onnxruntime's MatMulNBitsQuantizer on quantcal's unquantized export: RTN (asymmetric,
  symmetric, int8), HQQ, k_quant and GPTQ; llm-compressor's GPTQ and AWQ (4-bit asymmetric,
  group ``--group``) when it imports.

The evaluator, per window: NLL of its scored tokens, KL (nats) of the next-token
distribution from the FP torch model's. KL: token-weighted mean with its standard error
(windows as clusters, quantcal eval's delta method); perplexity per corpus with the paired
standard error of its NLL/token difference to FP (per-window differences). Bytes: ONNX
initializers, floats at 2 bytes (the fp16 export); llm-compressor's by quantcal's int4
arithmetic. Writes OUT/compare.json, OUT/compare.png (quality vs bytes); prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import matmul_nbits_quantizer as mnq
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantcal.calibrate.analysis import HELD_OUT_SETS, replan
from quantcal.calibrate.api import calibrate
from quantcal.calibrate.data import recorded_windows
from quantcal.calibrate.planner import Rules
from quantcal.calibrate.plans import describe
from quantcal.config import Budget, CalibrateConfig, LayerPlan
from quantcal.evaluate.tasks import get_task
from quantcal.evaluate.tasks.perplexity import nll_stderr
from quantcal.export.api import export_onnx
from quantcal.formats import FP16, Int4, parse_format, parse_formats
from quantcal.models import quantizable_layers
from quantcal.rundir import QPARAMS, RunDir, atomic_write_json
from quantcal.runner import DecoderRunner
from quantcal.session import make_session

REPO = Path(__file__).resolve().parents[1]
UNIFORM = ("int4-g128", "int4-g64", "int8")
MIXED_FROM, MIXED_AT = "quantcal-awq", "int4-g64"  # run planned, at this uniform plan's size
QUANTCAL = {  # row prefix -> CalibrateConfig fields; a new quantcal method is one entry
    "quantcal-rtn": dict(weight_method="rtn"),
    "quantcal-clip": dict(weight_method="aware"),
    "quantcal-awq": dict(weight_method="aware", awq=True),
    "quantcal-gptq": dict(weight_method="aware", hessian=True),
}
CORPORA = ("wikitext2", "c4")
Logits = Callable[[np.ndarray], np.ndarray]  # ids (1, S) -> logits (1, S, V)


@dataclass
class Row:
    name: str
    bytes: int | None = None
    kl: float | None = None
    kl_se: float | None = None
    ppl: dict = field(default_factory=dict)  # corpus -> perplexity
    dnll: dict = field(default_factory=dict)  # corpus -> NLL/token minus FP's
    dnll_se: dict = field(default_factory=dict)  # its paired standard error
    quantize_s: float = 0.0  # calibration (shared by a run's rows) + export, or quantizer
    path: str = ""  # the ONNX model scored
    error: str = ""  # why the method did not run
    note: str = ""


def _log_softmax(x: np.ndarray) -> np.ndarray:
    """float32 log-probs computed in float64 (the references are kept: half the memory)."""
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(-1, keepdims=True))).astype(np.float32)


class Evaluator:
    """The one scorer: the FP log-probs of every window, kept; each candidate against them."""

    def __init__(self, fp: Logits, windows: dict):
        self.windows = windows  # corpus -> [PerplexityWindow]; refs kept: (T, V) float32 each
        self.ref = {c: [self._logp(fp, w) for w in ws] for c, ws in windows.items()}
        self.fp_nll = {c: [self._nll(r, w) for r, w in zip(self.ref[c], ws)]
                       for c, ws in windows.items()}

    @staticmethod
    def _logp(logits: Logits, w) -> np.ndarray:
        ids = np.asarray([w.input_ids], dtype=np.int64)
        return _log_softmax(logits(ids)[0, w.score_from - 1:-1])  # (T, V): scored positions

    @staticmethod
    def _nll(logp: np.ndarray, w) -> float:
        targets = np.asarray(w.input_ids[w.score_from:])
        return float(-logp[np.arange(len(targets)), targets].sum())

    def _per_window(self, logits: Logits, corpus: str):
        nll, kl, tokens = [], [], []
        for w, ref in zip(self.windows[corpus], self.ref[corpus]):
            logp = self._logp(logits, w)
            nll.append(self._nll(logp, w))
            kl.append(float((np.exp(ref, dtype=np.float64) * (ref - logp)).sum()))
            tokens.append(float(w.n_scored))
        return nll, kl, tokens

    def score(self, row: Row, logits: Logits) -> Row:
        kls, counts = [], []
        for corpus in self.windows:
            nll, kl, tokens = self._per_window(logits, corpus)
            diff = [a - b for a, b in zip(nll, self.fp_nll[corpus])]
            row.ppl[corpus] = math.exp(sum(nll) / sum(tokens))
            row.dnll[corpus] = sum(diff) / sum(tokens)
            row.dnll_se[corpus] = nll_stderr(diff, tokens)
            kls += kl
            counts += tokens
        row.kl, row.kl_se = sum(kls) / sum(counts), nll_stderr(kls, counts)
        return row


def onnx_logits(path: Path, provider: str) -> Logits:
    runner = DecoderRunner(*make_session(path, provider))

    def run(ids: np.ndarray) -> np.ndarray:  # a prefill starts from an empty cache
        return np.asarray(runner.prefill(ids), dtype=np.float32)
    return run


def torch_logits(model) -> Logits:
    def run(ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(ids), use_cache=False).logits.float().numpy()
    return run


def onnx_bytes(path: Path) -> int:
    """Initializer bytes, floats at 2 bytes per element (what the fp16 export stores)."""
    total = 0
    for t in onnx.load(str(path), load_external_data=False).graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        total += math.prod(t.dims) * (2 if np.issubdtype(dtype, np.floating) else dtype.itemsize)
    return total


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"[:200]


def _attempt(name: str, make: Callable, score, before_s: float = 0.0) -> Row:
    """A row: ``make()`` quantizes, returns ``(bytes, logits, path)``; or fails, the error."""
    t = time.perf_counter()
    try:
        nbytes, logits, path = make()
    except Exception as exc:
        return Row(name, error=_error(exc))
    return score(Row(name, nbytes, quantize_s=before_s + time.perf_counter() - t,
                     path=str(path or "")), logits)


def _uniform_plan(record, fmt):
    """Every linear layer in ``fmt`` (the embedding fp16), for this run's qparams."""
    layers = {n: LayerPlan(format=fmt, bytes=fmt.weight_bytes(i.out_features, i.in_features),
                           bits=fmt.bits_per_weight(i.out_features, i.in_features))
              for n, i in record.layers.items() if i.kind != "embedding"}
    return replace(describe(record, layers, Budget()), made_from={QPARAMS: record.files[QPARAMS]})


def _export(run, plan, out: Path, name: str, provider: str) -> Path:
    folder = out / "models" / name.replace(" ", "_").replace("@", "-at-")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "plan.json", plan)
    path = folder / "model.onnx"
    export_onnx(run, plan_path=folder / "plan.json", provider=provider, output=path)
    return path


def quantcal_rows(args, out: Path, score) -> tuple[list[Row], Path | None, object]:
    """Every quantcal method's rows; also the unquantized export and the first run."""
    rows, fp_path, first = [], None, None
    base = dict(model=args.model, data=args.data, samples=args.samples, seq_len=args.seq_len,
                batch_size=args.batch_size, seed=args.seed, device=args.device,
                formats=parse_formats(",".join(UNIFORM)),
                sensitivity_samples=args.sensitivity_samples)
    for method, fields in QUANTCAL.items():
        run = RunDir(out / "runs" / method)
        t = time.perf_counter()
        try:  # every run holds out as many windows, so all calibrate on the same ones
            sens = "exact" if method == MIXED_FROM else "fast"  # exact: for the mixed plan
            record = calibrate(CalibrateConfig(**base, sensitivity=sens, **fields), run,
                               overwrite=True, progress=False)
        except Exception as exc:  # a method that does not run is a row that says why
            rows.append(Row(f"{method} (calibrate)", error=_error(exc)))
            continue
        first = first or run
        cal_s = time.perf_counter() - t
        plans = {f"{method} {f}": lambda f=f: _uniform_plan(record, parse_format(f))
                 for f in UNIFORM}
        if fp_path is None:
            fp_path = _export(run, _uniform_plan(record, FP16()), out, "fp16", args.provider)
        if method == MIXED_FROM:
            size = _uniform_plan(record, parse_format(MIXED_AT)).predicted_size_bytes
            plans[f"{method} mixed@{MIXED_AT}"] = lambda: replan(
                run, budget=Budget("max_size", float(size)), rules=Rules(),
                output=out / "runs" / "mixed-plan.json", measure=False, progress=False)
        for name, plan in plans.items():
            rows.append(_attempt(name, lambda: _onnx_row(_export(
                run, plan(), out, name, args.provider), args.provider), score, cal_s))
    return rows, fp_path, first


def _onnx_row(path: Path, provider: str):  # what _attempt wants of an ONNX model
    return onnx_bytes(path), onnx_logits(path, provider), path


def _feeds(path: Path, windows: torch.Tensor) -> list[dict]:
    """Windows as feeds of quantcal's graph: onnxruntime's GPTQ deep-copies and iterates them."""
    inputs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()
    out = []
    for ids in windows.numpy().astype(np.int64)[:, None]:  # (1, L) each
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                 "position_ids": np.arange(ids.shape[1])[None],
                 "total_sequence_length": np.array(ids.shape[1], np.int32)}
        out.append({i.name: feeds[i.name] if i.name in feeds else np.zeros(
            (1, i.shape[1], 0, i.shape[3]), np.float16 if "float16" in i.type else np.float32)
            for i in inputs})
    return out


def _inputs_consumed(model):
    """An Identity on each input no node reads (position_ids), the same function: the Intel
    Neural Compressor behind k_quant and GPTQ sorts nodes from the inputs, failing there."""
    read = {name for node in model.graph.node for name in node.input}
    for inp in model.graph.input:
        if inp.name not in read:
            model.graph.node.append(onnx.helper.make_node(
                "Identity", [inp.name], [inp.name + "/unread"], name=inp.name + "/unread"))
    return model


def ort_rows(args, fp_path: Path, calib: torch.Tensor, out: Path, score) -> list[Row]:
    """onnxruntime's MatMulNBitsQuantizer on the unquantized export."""
    g = args.group
    configs = {  # row -> (quantizer keyword arguments, algorithm config maker)
        f"ort-rtn int4-g{g}": (dict(block_size=g), lambda: None),
        "ort-rtn int4-g64": (dict(block_size=64), lambda: None),
        f"ort-rtn int4-g{g}-sym": (dict(block_size=g, is_symmetric=True), lambda: None),
        "ort-rtn int8": (dict(block_size=128, bits=8), lambda: None),
        f"ort-hqq int4-g{g}": (dict(block_size=g),
                               lambda: mnq.HQQWeightOnlyQuantConfig(block_size=g, bits=4)),
        f"ort-k_quant int4-g{g}": (dict(block_size=g), mnq.KQuantWeightOnlyQuantConfig),
        f"ort-gptq int4-g{g}": (dict(block_size=g), lambda: mnq.GPTQWeightOnlyQuantConfig(
            calibration_data_reader=_feeds(fp_path, calib), block_size=g)),
    }

    def quantize(name: str, kwargs: dict, config):
        path = out / "models" / name.replace(" ", "_") / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        quantizer = mnq.MatMulNBitsQuantizer(_inputs_consumed(onnx.load(str(fp_path))),
                                             algo_config=config(), **kwargs)
        quantizer.process()
        model = getattr(quantizer.model, "model", quantizer.model)
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")
        return _onnx_row(path, args.provider)
    return [_attempt(name, lambda: quantize(name, *how), score) for name, how in configs.items()]


def llmcompressor_rows(args, calib: torch.Tensor, fp_bytes: int, score) -> list[Row]:
    """llm-compressor's GPTQ and AWQ (W4 asymmetric, group ``--group``), if it imports."""
    try:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.awq import AWQModifier
        from llmcompressor.modifiers.quantization import GPTQModifier
    except Exception as exc:  # not installed, or not importable with this torch/transformers
        print(f"llm-compressor rows skipped: {_error(exc)} (pip install llmcompressor, "
              "with a torch and transformers it accepts)")
        return []
    data = Dataset.from_dict({"input_ids": calib.tolist(),
                              "attention_mask": torch.ones_like(calib).tolist()})
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group",
                               group_size=args.group)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)

    def quantize(modifier):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        oneshot(model=model, dataset=data, recipe=[modifier(config_groups={"g": scheme})],
                max_seq_length=calib.shape[1], num_calibration_samples=len(calib))
        linear = [i for i in quantizable_layers(model).values() if i.kind == "linear"]
        nbytes = fp_bytes + sum(Int4(args.group).weight_bytes(i.out_features, i.in_features)
                                - 2 * i.out_features * i.in_features for i in linear)
        return nbytes, torch_logits(model.eval()), None
    return [_attempt(f"llmc-{what} int4-g{args.group}", lambda: quantize(modifier), score)
            for what, modifier in (("gptq", GPTQModifier), ("awq", AWQModifier))]


def _note_duplicates(rows: list[Row]) -> None:
    """Say when a row scores as an earlier one to 6 digits (the same codes, most likely)."""
    seen: dict[tuple, str] = {}
    for r in (r for r in rows if not r.error):
        key = tuple(f"{v:.6g}" for v in (r.kl, *r.ppl.values()))
        r.note = f"scores as {seen[key]} to 6 digits" if key in seen else ""
        seen.setdefault(key, r.name)


def format_table(rows: list[Row]) -> str:
    head = (f"{'method':32} {'MB':>7} {'KL nats/tok +- se':>20} "
            + " ".join(f"{c + ' ppl':>11} {'dNLL +- se':>19}" for c in CORPORA) + " quant_s")
    lines = [head, "-" * len(head)]
    for r in rows:
        cols = " ".join(f"{r.ppl[c]:11.3f} {r.dnll[c]:+9.4f} +- {r.dnll_se[c] or 0:.4f}"
                        for c in CORPORA) if not r.error else ""
        lines.append(f"{r.name:32} failed: {r.error}" if r.error else
                     f"{r.name:32} {r.bytes / 1e6:7.3f} {r.kl:9.2e} +- {r.kl_se or 0:.2e} "
                     f"{cols} {r.quantize_s:7.1f}" + (f"  ({r.note})" if r.note else ""))
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(CORPORA), figsize=(6 * (1 + len(CORPORA)), 5))
    markers = {"quantcal": "o", "ort": "s", "llmc": "^"}
    for r in (r for r in rows if not r.error):
        fmt, x = markers.get(r.name.split("-")[0], "*"), r.bytes / 1e6
        axes[0].errorbar(x, max(r.kl, 1e-12), yerr=r.kl_se or 0, fmt=fmt, label=r.name)
        for ax, c in zip(axes[1:], CORPORA):
            ax.errorbar(x, r.ppl[c], fmt=fmt)
    axes[0].set_yscale("log")
    for ax, label in zip(axes, ["KL to FP (nats/token)"] + [f"{c} perplexity" for c in CORPORA]):
        ax.set(ylabel=label, xlabel="weights + tables (MB, floats as fp16)")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default="c4")
    ap.add_argument("--data-dir", type=Path, default=REPO / "tests" / "data")
    for flag, default in (("samples", 128), ("seq-len", 512), ("batch-size", 8), ("seed", 0),
                          ("sensitivity-samples", 16), ("eval-windows", 16),  # per corpus
                          ("eval-seq-len", None), ("group", 128)):  # the peers' int4 group
        ap.add_argument(f"--{flag}", type=int, default=default)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", type=Path, default=Path("compare-out"))
    args = ap.parse_args(argv)
    os.environ["QUANTCAL_DATA_DIR"] = str(args.data_dir)  # calibrate's named sets read here
    for noisy in ("onnxruntime.quantization", "neural_compressor"):  # INFO lines per node
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(args.model)
    fp = torch_logits(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32))
    seq = args.eval_seq_len or args.seq_len
    windows = {c: get_task(c, seq_len=seq, stride=seq).load(
        args.data_dir, limit=args.eval_windows, tokenizer=tok) for c in CORPORA}
    score = Evaluator(fp, windows).score
    qrows, fp_path, first = quantcal_rows(args, args.out, score)
    if fp_path is None:
        raise SystemExit("no quantcal run succeeded: " + "; ".join(r.error for r in qrows))
    fp_bytes = onnx_bytes(fp_path)  # the FP model's size: the unquantized export's
    rows = [score(Row("fp (torch)", fp_bytes), fp),
            _attempt("fp16 plan (onnx)", lambda: _onnx_row(fp_path, args.provider), score)]
    calib, _ = recorded_windows(first.read_run(), tok,
                                holdout=HELD_OUT_SETS * args.sensitivity_samples)
    rows += (qrows + ort_rows(args, fp_path, calib, args.out, score)
             + llmcompressor_rows(args, calib, fp_bytes, score))
    _note_duplicates(rows)
    (args.out / "compare.json").write_text(json.dumps(
        {"model": args.model, "windows": {c: len(w) for c, w in windows.items()},
         "eval_seq_len": seq, "rows": [asdict(r) for r in rows]}, indent=1))
    plot(rows, args.out / "compare.png")
    print(format_table(rows))
    print(f"wrote {args.out / 'compare.json'} and {args.out / 'compare.png'}")
    return rows


if __name__ == "__main__":
    main()
