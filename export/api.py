"""``export_onnx``: the export stage's one entry point.

Reads ``run.json``, ``qparams.safetensors`` and the plan (``plan.json`` or a user's edited
copy, checked against the run); builds the decoder for the model's family; writes
``model.onnx`` (+ ``.onnx.data``) atomically; then verifies what it wrote and records the
figures in ``export.json``: the ONNX checker, logits against the torch model with the same
fake-quant applied, and greedy decoding with the KV cache against full recomputation. A
failed check is an error (the files stay, for inspection, but ``export.json`` says failed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import torch

from quantcal.config import Strict
from quantcal.errors import QuantcalError
from quantcal.export.builder import save_model
from quantcal.export.decoder import build_llama
from quantcal.export.decoder_gpt2 import build_gpt2
from quantcal.export.emit import graph_op_counts
from quantcal.export.parity import check_parity
from quantcal.fakequant import fake_quant_modules, swapped
from quantcal.models import family_of, load_model
from quantcal.plancheck import resolved_formats
from quantcal.rundir import EXPORT_JSON, MODEL, QPARAMS, RunDir, atomic_write_json

BUILDERS = {"llama": build_llama, "gpt2": build_gpt2}  # keyed by models.Family.name
DTYPES = {"cuda": np.float16, "cpu": np.float32}


@dataclass(frozen=True)
class ExportRecord(Strict):
    """``export.json``: what was exported and how well it matches torch."""

    versioned: ClassVar[bool] = True

    model: str
    provider: str
    dtype: str
    path: str
    file_bytes: int
    ops: dict[str, int] = field(default_factory=dict)
    parity: dict[str, float] = field(default_factory=dict)
    passed: bool = False
    timings: dict[str, float] = field(default_factory=dict)


def export_onnx(run: RunDir, *, plan_path: Path | None = None, provider: str = "cuda",
                output: Path | None = None, verify_provider: str | None = None
                ) -> ExportRecord:
    """Export the run's model under its plan; verify (on ``verify_provider``, by default
    the target provider, CPU when CUDA cannot run); write ``export.json``."""
    if provider not in DTYPES:
        raise QuantcalError(f"--provider {provider!r}: use cuda or cpu")
    t0 = time.perf_counter()
    record = run.read_run()
    plan = run.read_plan(plan_path)
    qparams, meta = run.load_tensors(QPARAMS, "qparams")
    formats = resolved_formats(plan, record, meta.get("formats", "").split(","))
    model, _ = load_model(record.config.model, revision=record.config.revision,
                          dtype=torch.float32, device="cpu")
    builder = BUILDERS.get(family_of(model).name)
    if builder is None:
        raise QuantcalError(f"no ONNX exporter for the {family_of(model).name} family yet")
    dtype = DTYPES[provider]
    graph = builder(model, formats, qparams, dtype).model()
    path = Path(output) if output else run.file(MODEL)
    save_model(graph, path)
    timings = {"build_s": time.perf_counter() - t0}
    onnx.checker.check_model(str(path), full_check=False)

    t = time.perf_counter()
    with swapped(model, fake_quant_modules(model, formats, qparams)):
        parity = check_parity(path, model, provider=verify_provider or provider, dtype=dtype)
    timings["verify_s"] = time.perf_counter() - t
    files = [path, path.with_name(path.name + ".data")]
    out = ExportRecord(
        model=record.config.model, provider=provider, dtype=np.dtype(dtype).name,
        path=str(path), file_bytes=sum(p.stat().st_size for p in files if p.exists()),
        ops=graph_op_counts(graph), parity=parity, passed=bool(parity["passed"]),
        timings=timings)
    atomic_write_json(run.file(EXPORT_JSON), out)
    if not out.passed:
        raise QuantcalError(
            f"the exported model does not match torch (logits max abs error "
            f"{parity['logits_max_abs']:.3g}, decode step {parity['decode_step_max_abs']:.3g}, "
            f"tolerance {parity['tolerance']:.3g}; greedy decoding with the cache "
            f"{'matches' if parity['greedy_match'] else 'differs from'} recomputation); see "
            f"{run.file(EXPORT_JSON)}")
    return out
