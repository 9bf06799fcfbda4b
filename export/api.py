"""``export_onnx``: the export stage's one entry point.

Reads ``run.json``, ``qparams.safetensors`` and the plan (``plan.json`` or a user's edited
copy), and refuses them unless they belong together and the model's files are still the
ones calibrated (:mod:`quantcal.provenance`). Builds the decoder for the model's family
(q/k/v and gate/up of one format as one node each unless ``fuse`` is off,
:mod:`quantcal.export.fusion`) and writes ``model.onnx`` (+ ``.onnx.data``) into a staging
folder, block by block: the model is loaded in float32 with its decoder blocks left in the
memory-mapped checkpoint (``low_memory``, :mod:`quantcal.lazymodel`), each block read while
its nodes are built and its packed weights written straight to the ``.data`` file
(:class:`quantcal.export.builder.ExternalData`), so no copy of the whole model is held.
It verifies the model there (the ONNX checker, logits against the torch model with the same
fake-quant, greedy decoding with the KV cache against recomputation, every layer alone or
through its fused node) and, only when it passed, promotes the model with its record
(``export.json``) as one transaction (:mod:`quantcal.txn`), with the files that make its
folder an onnxruntime-genai model (:mod:`quantcal.export.genai`). A failed or interrupted
export leaves the previous verified export untouched; a failed one is set aside in
``.failed-export/`` for inspection. An export written elsewhere (``-o DIR/NAME.onnx``) gets
its own record beside it (:func:`quantcal.provenance.record_path`) and never touches the
run's.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from quantcal.calibrate.awq import fold_awq_
from quantcal.errors import QuantcalError, StageInterrupted
from quantcal.export.builder import ExternalData, save_model
from quantcal.export.emit import graph_op_counts
from quantcal.export.genai import write_genai_files
from quantcal.export.graphs import build_decoder
from quantcal.export.parity import check_parity, failure_detail
from quantcal.lazymodel import TensorFile
from quantcal.models import load_model
from quantcal.plancheck import resolved_formats
from quantcal.provenance import (
    ExportRecord, check_digest, check_model_unchanged, onnx_digests, record_path, sha256_file,
)
from quantcal.resources import peak_figures, start_stage
from quantcal.rundir import MODEL, PLAN, QPARAMS, RUN_JSON, RunDir, atomic_write_json
from quantcal.session import resolve_provider
from quantcal.txn import Stage

DTYPES = {"cuda": np.float16, "cpu": np.float32}
log = logging.getLogger(__name__)


def _checked_inputs(run: RunDir, plan_path: Path | None):
    """run.json, the plan and the qparams, refused unless they belong together and the
    model's files are the ones calibrated."""
    record = run.read_run()
    plan = run.read_plan(plan_path)
    qpath = run.require(QPARAMS)
    remedy = "re-run `quantcal calibrate` on this run directory"
    check_digest(qpath, record.files.get(QPARAMS), str(run.file(RUN_JSON)), remedy)
    check_digest(qpath, plan.made_from.get(QPARAMS), f"the plan {plan_path or run.file(PLAN)}",
                 f"make the plan from this run (`quantcal plan --run {run.path}`) or start "
                 f"your edits from {run.file(PLAN)}")
    check_model_unchanged(record.config.model, record.config.revision, record.model_files,
                          str(run.file(RUN_JSON)))
    plan_digest = sha256_file(Path(plan_path) if plan_path else run.file(PLAN))
    made_from = {**{f"model/{k}": v for k, v in record.model_files.items()},
                 QPARAMS: sha256_file(qpath), PLAN: plan_digest}
    return record, plan, made_from


def _finite(figures: dict) -> dict:
    """JSON has no NaN: a non-finite figure (a broken export) is recorded as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in figures.items()}


def export_onnx(run: RunDir, *, plan_path: Path | None = None, provider: str = "cuda",
                output: Path | None = None, verify_provider: str | None = None,
                fuse: bool | tuple[str, ...] = True) -> ExportRecord:
    """Export the run's model under its plan for ``provider`` (``auto``: cuda where it runs,
    else cpu, decided once the inputs are known good); verify it (on ``verify_provider``, by
    default the target provider, which must then run here); commit it with its record.
    ``fuse``: q/k/v sharing a format as one node each, or the kinds of group to fuse
    (:func:`quantcal.export.fusion.fuse_kinds`; the record's ``fused`` names them)."""
    if provider not in (*DTYPES, "auto"):
        raise QuantcalError(f"--provider {provider!r}: use auto, cuda or cpu")
    record, plan, made_from = _checked_inputs(run, plan_path)
    path = Path(output) if output else run.file(MODEL)
    if path.suffix != ".onnx":
        raise QuantcalError(f"-o {path}: name the model file NAME.onnx")
    if provider == "auto" or verify_provider is None:
        provider = resolve_provider(provider)  # an explicit cuda that cannot run: refused now
    folder, own = path.parent, output is None or path.resolve() == run.file(MODEL).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with run.lock("export"):
            stage = Stage(folder, f"export-{path.stem}",
                          staging_root=".staging" if own else ".quantcal-staging")
            try:
                out = _build_and_verify(stage, path, run, record, plan, made_from,
                                        provider, verify_provider, fuse)
                if not out.passed:
                    failed = folder / (".failed-export" if own else f".failed-{path.stem}")
                    stage.set_aside(failed)
                    raise QuantcalError(_failure(out, path, failed, plan))
                stage.commit([path.name, path.name + ".data", *out.genai,
                              record_path(path).name],
                             remove=[path.name + ".data"])
            finally:
                stage.discard()
    except KeyboardInterrupt:
        raise StageInterrupted(f"the export was not committed; {path} and its record are "
                               "as they were") from None
    return out


def _build_and_verify(stage: Stage, final: Path, run: RunDir, record, plan, made_from: dict,
                      provider: str, verify_provider: str | None, fuse: bool
                      ) -> ExportRecord:
    """Build, save and verify the model in the staging folder; write its record there."""
    start_stage()
    t0 = time.perf_counter()
    meta = run.load_tensors(QPARAMS, "qparams")[1]  # checked; then read a layer at a time
    qparams = TensorFile(run.file(QPARAMS))
    formats = resolved_formats(plan, record, meta.get("formats", "").split(","))
    model, tokenizer = _load(record)
    fold_awq_(model, qparams)  # a --awq run's scales, folded in as calibrate folded them
    dtype = DTYPES[provider]
    staged = stage.file(final.name)
    with ExternalData(staged) as data:  # weights written as the graph is built
        builder = build_decoder(model, formats, qparams, dtype, fuse=fuse, data=data)
        graph = builder.model()
        save_model(graph, staged, data=data)
    timings = {"build_s": time.perf_counter() - t0}
    onnx.checker.check_model(str(staged), full_check=False)
    t = time.perf_counter()
    parity = check_parity(staged, model, formats, qparams,
                          provider=verify_provider or provider, dtype=dtype,
                          fused=builder.fused)
    timings["verify_s"] = time.perf_counter() - t
    files = onnx_digests(staged)
    genai = write_genai_files(stage.dir, final.name, model, tokenizer, record.config.model,
                              record.config.revision, provider)
    out = ExportRecord(
        model=record.config.model, provider=provider, dtype=np.dtype(dtype).name,
        path=final.name, file_bytes=sum((stage.dir / n).stat().st_size for n in files),
        ops=graph_op_counts(graph), parity=_finite(parity), passed=bool(parity["passed"]),
        timings={**timings, **peak_figures()}, made_from=made_from, files=files,
        genai=genai, fused=builder.fused)
    atomic_write_json(stage.file(record_path(final).name), out)
    return out


def _load(record):
    """The run's model in float32 on the CPU, its decoder blocks left in the memory-mapped
    checkpoint until the graph, the parity checks or a forward reads them (one or two at a
    time) when accelerate is installed; else loaded whole."""
    low_memory = importlib.util.find_spec("accelerate") is not None
    if not low_memory:
        log.warning("quantcal: accelerate is not installed, so the whole model is loaded in "
                    "float32 for export; pip install accelerate to export block by block")
    return load_model(record.config.model, revision=record.config.revision,
                      trust_remote_code=record.config.trust_remote_code, dtype=torch.float32,
                      device="cpu", low_memory=low_memory)


def _failure(out: ExportRecord, path: Path, failed: Path, plan) -> str:
    p = out.parity
    formats = {name: entry.format.name for name, entry in plan.layers.items()}

    def fmt(v):
        return "non-finite" if v is None else f"{v:.3g}"
    return (f"the exported model does not match torch (logits max abs error "
            f"{fmt(p.get('logits_max_abs'))}, decode step {fmt(p.get('decode_step_max_abs'))}, "
            f"tolerance {fmt(p.get('tolerance'))}; greedy decoding with the cache "
            f"{'matches' if p.get('greedy_match') else 'differs from'} recomputation)"
            f"{failure_detail(p, formats)}; {path} was not replaced; the failed model and its "
            f"record are in {failed}")
