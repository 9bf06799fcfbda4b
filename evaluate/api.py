"""``quantcal eval``: score a model and, with ``--baseline``, the FP source model beside it.

MODEL is a HF id or folder (torch backend), an ``.onnx`` file or a run directory (onnxruntime
backend), or nothing (the run directory's exported model). Results go to ``eval.json``
under a label per variant, with size on disk and, for exported models, prefill and decode
tokens/s; a table is printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from quantcal.evaluate.backends import make_backend
from quantcal.evaluate.evaluator import EvalRecord, evaluate_variant, read_eval
from quantcal.evaluate.speed import bench_model
from quantcal.export.positions import model_positions
from quantcal.provenance import model_digests, model_folder, onnx_digests
from quantcal.rundir import RunDir


def _size_and_speed(backend, provider: str) -> tuple[int, dict[str, float]]:
    path = getattr(backend, "path", None)
    if path is None:  # torch: the parameters' bytes in memory
        model = getattr(backend, "model", None)
        size = sum(p.numel() * p.element_size() for p in model.parameters()) if model else 0
        return size, {}
    path = Path(path)
    files = [path, path.with_name(path.name + ".data")]
    size = sum(p.stat().st_size for p in files if p.exists())
    prompt = max(1, min(256, model_positions(path) - 32))  # within small models' positions
    figures = bench_model(path, provider=provider, prompt_len=prompt, new_tokens=32,
                          repeats=1)
    return size, {k: float(figures[k]) for k in ("prefill_tok_s", "decode_tok_s")
                  if figures.get(k) is not None}


def _provenance(backend, name: str | None, run: RunDir) -> tuple[str, dict[str, str]]:
    """The scored model's path (relative to the run directory when inside it) and the
    digests of its files."""
    path = getattr(backend, "path", None)
    if path is not None:
        path = Path(path).resolve()
        inside = path.parent == run.path.resolve()
        return (path.name if inside else str(path)), onnx_digests(path)
    folder = model_folder(name) if name else None
    return (str(folder.resolve()) if folder else str(name)), model_digests(str(name))


def evaluate(model: str | None, run: RunDir, tasks: Sequence[str], *, limit: int | None,
             sample: int | None, seed: int, provider: str, data_dir: Path | None,
             baseline: bool, device: str = "cpu", batch_size: int = 8,
             seq_len: int | None = None, stride: int | None = None,
             progress: bool = True, allow_overlap: bool = False) -> EvalRecord:
    """Evaluate ``model`` (and the FP baseline) on ``tasks``; returns the whole eval.json,
    which is written under the run directory's lock. Perplexity text that this run's
    calibration read is refused unless ``allow_overlap`` (then eval.json records it)."""
    jobs = [(model, False)]
    if baseline:
        jobs.append((run.read_run().config.model, True))
    with run.lock("eval"):
        for name, is_baseline in jobs:
            _evaluate_one(name, is_baseline, run, tasks, limit=limit, sample=sample, seed=seed,
                          provider=provider, data_dir=data_dir, device=device,
                          batch_size=batch_size, seq_len=seq_len, stride=stride,
                          progress=progress, allow_overlap=allow_overlap)
    return read_eval(run)


def _evaluate_one(name, is_baseline, run, tasks, *, provider, device, batch_size,
                  **kw) -> None:
    backend = make_backend(name, run, provider=provider, device=device, batch_size=batch_size)
    label = ("baseline fp32 (torch)" if is_baseline else
             f"{backend.name}:{Path(str(getattr(backend, 'path', name))).name}")
    try:
        size, speed = _size_and_speed(backend, provider)
        source, made_from = _provenance(backend, name, run)
        evaluate_variant(label, backend, tasks, run, size_bytes=size, speed=speed,
                         source=source, made_from=made_from, **kw)
    finally:
        close = getattr(backend, "close", None)
        if close:
            close()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
