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
    figures = bench_model(path, provider=provider, prompt_len=256, new_tokens=32, repeats=1)
    return size, {k: float(figures[k]) for k in ("prefill_tok_s", "decode_tok_s")
                  if figures.get(k) is not None}


def evaluate(model: str | None, run: RunDir, tasks: Sequence[str], *, limit: int | None,
             sample: int | None, seed: int, provider: str, data_dir: Path | None,
             baseline: bool, device: str = "cpu", batch_size: int = 8,
             seq_len: int | None = None, stride: int | None = None,
             progress: bool = True) -> EvalRecord:
    """Evaluate ``model`` (and the FP baseline) on ``tasks``; returns the whole eval.json."""
    jobs = [(model, False)]
    if baseline:
        jobs.append((run.read_run().config.model, True))
    for name, is_baseline in jobs:
        backend = make_backend(name, run, provider=provider, device=device,
                               batch_size=batch_size)
        label = ("baseline fp32 (torch)" if is_baseline else
                 f"{backend.name}:{Path(str(getattr(backend, 'path', name))).name}")
        try:
            size, speed = _size_and_speed(backend, provider)
            evaluate_variant(label, backend, tasks, run, data_dir=data_dir, limit=limit,
                             sample=sample, seed=seed, seq_len=seq_len, stride=stride,
                             size_bytes=size, speed=speed, progress=progress)
        finally:
            close = getattr(backend, "close", None)
            if close:
                close()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return read_eval(run)
