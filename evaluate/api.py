"""``quantcal eval``: score a model and, with ``--baseline``, the FP source model beside it.

MODEL is a HF id or folder (torch backend), an ``.onnx`` file or a run directory (onnxruntime
backend), or nothing (the run directory's exported model). Results go to ``eval.json``
under a label per variant, with size on disk and, for exported models, prefill and decode
tokens/s; a table is printed. With ``output`` they are also written as lm-eval writes them,
with per-document samples when asked (:mod:`quantcal.evaluate.outputs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from quantcal.errors import QuantcalError
from quantcal.evaluate.backends import make_backend
from quantcal.evaluate.evaluator import (
    PERPLEXITY_TASKS, EvalRecord, VariantResult, evaluate_variant, read_eval,
)
from quantcal.evaluate.outputs import lm_eval_results, results_path, write_outputs
from quantcal.evaluate.tasks import get_task
from quantcal.models import config_or_none, resolve_device
from quantcal.evaluate.speed import bench_model
from quantcal.export.positions import model_positions
from quantcal.provenance import model_digests, model_folder, onnx_digests
from quantcal.resources import start_stage
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


def _check_fewshot(tasks: Sequence[str], num_fewshot: int | None) -> None:
    if num_fewshot is not None and all(t in PERPLEXITY_TASKS for t in tasks):
        raise QuantcalError(f"--num-fewshot sets the exemplars of hellaswag and gsm8k; "
                            f"{', '.join(tasks)} take none: drop it or add those tasks")


def evaluate(model: str | None, run: RunDir, tasks: Sequence[str], *, limit: int | None,
             sample: int | None, seed: int, provider: str, data_dir: Path | None,
             baseline: bool, device: str = "auto", batch_size: int = 8,
             seq_len: int | None = None, stride: int | None = None,
             progress: bool = True, allow_overlap: bool = False,
             num_fewshot: int | None = None, output: Path | None = None,
             log_samples: bool = False) -> EvalRecord:
    """Evaluate ``model`` (and the FP baseline) on ``tasks``; returns the whole eval.json,
    which is written under the run directory's lock. Perplexity text that this run's
    calibration read is refused unless ``allow_overlap`` (then eval.json records it).

    Args:
        device: where torch backends run: ``auto`` (CUDA when available), ``cpu``, ``cuda``.
        num_fewshot: exemplars per hellaswag / gsm8k document (None: 0 and 5).
        output: also write lm-eval's results JSON there (a ``.json`` file or a folder);
            with ``log_samples``, each document's requests, answers and scores beside it.
    """
    _check_fewshot(tasks, num_fewshot)
    if log_samples and output is None:
        raise QuantcalError("--log-samples writes beside the results file: pass --output "
                            "PATH too (as lm-eval's --log_samples needs --output_path)")
    if output is not None:  # a folder that cannot be made fails now, not after the work
        results_path(output).parent.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    jobs = [(model, False)]
    if baseline:
        jobs.append((run.read_run().config.model, True))
    samples: dict[str, dict[str, list]] = {}
    results: dict[str, Any] = {}
    with run.lock("eval"):
        for name, is_baseline in jobs:
            suffix = "_baseline" if is_baseline else ""
            logged = samples.setdefault(suffix, {}) if log_samples else None
            result = _evaluate_one(
                name, is_baseline, run, tasks, limit=limit, sample=sample, seed=seed,
                provider=provider, data_dir=data_dir, device=device,
                batch_size=batch_size, seq_len=seq_len, stride=stride, progress=progress,
                allow_overlap=allow_overlap, num_fewshot=num_fewshot, samples=logged)
            config = {"model": result.model, "source": result.source,
                      "backend": result.backend, "batch_size": batch_size, "limit": limit,
                      "sample": sample, "seed": seed}
            files = lm_eval_results({t: result.metrics[t] for t in tasks},
                                    {t: _n_shot(t, num_fewshot) for t in tasks},
                                    {t: result.docs[t] for t in tasks}, config)
            results.update({"baseline": files} if is_baseline else files)
    if output is not None:
        write_outputs(output, results, samples)
    return read_eval(run)


def _n_shot(task: str, num_fewshot: int | None) -> int:
    """The exemplars per document ``task`` used."""
    if num_fewshot is None or task in PERPLEXITY_TASKS:
        return getattr(get_task(task), "num_fewshot", 0)
    return num_fewshot


_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def torch_dtype(name: str | None, device: torch.device | str) -> torch.dtype:
    """How a torch model (the baseline, a HF id or folder) runs: float32 on CPU; on a GPU
    in the checkpoint's own dtype (``config.json``), float32 when it names none. An ONNX
    model (None, a file, a run) takes float32, unused."""
    if torch.device(device).type != "cuda" or name is None or Path(name).suffix == ".onnx":
        return torch.float32
    config = config_or_none(name)  # None: an export folder or run, onnxruntime decides
    found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    found = getattr(torch, found, None) if isinstance(found, str) else found
    return found if found in _SHORT else torch.float32


def _evaluate_one(name, is_baseline, run, tasks, *, provider, device, batch_size,
                  **kw) -> VariantResult:
    """Evaluate one variant into eval.json and return it."""
    start_stage()  # its peaks: the backend, the tasks
    dtype = torch_dtype(name, device)
    backend = make_backend(name, run, provider=provider, device=device, dtype=dtype,
                           batch_size=batch_size)
    label = (f"baseline {_SHORT[dtype]} (torch)" if is_baseline else
             f"{backend.name}:{Path(str(getattr(backend, 'path', name))).name}")
    try:
        size, speed = _size_and_speed(backend, provider)
        source, made_from = _provenance(backend, name, run)
        result = evaluate_variant(label, backend, tasks, run, size_bytes=size, speed=speed,
                                  source=source, made_from=made_from, **kw)
    finally:
        close = getattr(backend, "close", None)
        if close:
            close()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result
