"""``calibrate``: the stage's one entry point.

Reads a model (hub id or folder) and calibration text; writes ``stats.safetensors``,
``qparams.safetensors`` and ``run.json`` into the run directory. Everything is computed
before anything is written, and every write is atomic, so an interrupted or failed run leaves
the run directory as it was. ``run.json`` is written last: its presence marks a complete run.
"""

from __future__ import annotations

import datetime as _dt
import platform
import time
from dataclasses import replace

import torch

from quantcal import __version__
from quantcal.calibrate.analysis import analyse, write_analysis
from quantcal.calibrate.collect import collect_full, collect_sequential
from quantcal.calibrate.planner import Rules
from quantcal.calibrate.plans import check_budget
from quantcal.calibrate.data import load_calibration_data
from quantcal.calibrate.qparams import QPARAMS_KIND, compute_embedding_qparams, compute_qparams
from quantcal.calibrate.stats import STAT_KIND, stats_to_tensors
from quantcal.config import Budget, CalibrateConfig, RunRecord
from quantcal.errors import QuantcalError
from quantcal.models import (
    load_model, max_positions, quantizable_layers, resolve_device, resolve_dtype, weight_matrix,
)
from quantcal.rundir import (
    EVAL_JSON, EXPORT_JSON, MODEL, PLAN, QPARAMS, REPORT, RUN_JSON, SENSITIVITY, STATS, RunDir,
    read_record,
)

DOWNSTREAM = (SENSITIVITY, "sensitivity.png", PLAN, MODEL, MODEL + ".data", EXPORT_JSON,
              EVAL_JSON, REPORT)


def check_run_dir(run: RunDir, config: CalibrateConfig, overwrite: bool) -> None:
    """Refuse to mix runs: a folder holding a different calibration needs ``--overwrite``."""
    if run.path.exists() and not run.path.is_dir():
        raise QuantcalError(f"--run {run.path} is a file, not a directory; choose another path")
    if not run.has(RUN_JSON) or overwrite:
        return
    try:
        previous = read_record(run.file(RUN_JSON), RunRecord).config
    except QuantcalError:
        raise QuantcalError(f"{run.path} holds a run.json this quantcal cannot read; pass "
                            "--overwrite to replace it or choose another --run") from None
    if previous != config:
        diff = [f for f in config.__dataclass_fields__
                if getattr(previous, f) != getattr(config, f)]
        raise QuantcalError(
            f"{run.path} already holds a different run (differs in: {', '.join(diff)}); "
            "pass --overwrite to replace it, or choose another --run"
        )


def _versions() -> dict[str, str]:
    import transformers

    return {"quantcal": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def calibrate(config: CalibrateConfig, run: RunDir, *, overwrite: bool = False,
              budget: Budget | None = None, rules: Rules = Rules(),
              progress: bool = True) -> RunRecord:
    """Collect statistics and qparams for ``config.model`` and write them into ``run``;
    unless ``config.sensitivity`` is ``none``, also score every layer and plan for
    ``budget`` (None: about 4.5 bits per weight, see ``plans.default_budget``) under
    ``rules``.

    Returns:
        The ``run.json`` record written.
    """
    check_run_dir(run, config, overwrite)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    model, tokenizer = load_model(config.model, revision=config.revision, dtype=dtype,
                                  device="cpu" if config.sequential else device)
    limit = max_positions(model)
    if limit is not None and config.seq_len > limit:
        raise QuantcalError(f"--seq-len {config.seq_len} is longer than the model allows "
                            f"({limit} positions); use --seq-len {limit} or less")
    timings["load_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    analyse_it = config.sensitivity != "none"
    windows, held_out = load_calibration_data(
        config.data, tokenizer, seq_len=config.seq_len, samples=config.samples,
        seed=config.seed, holdout=config.sensitivity_samples if analyse_it else 0,
        text_field=config.text_field)
    timings["data_s"] = time.perf_counter() - t

    layers = quantizable_layers(model)
    shape_only = RunRecord(config=config, layers=layers, **_outside_bytes(model, layers))
    if analyse_it:  # an impossible budget or rule fails now, not after the heavy work
        check_budget(shape_only, budget, rules)
    modules = {n: model.get_submodule(n) for n, i in layers.items() if i.kind != "embedding"}
    collect = collect_sequential if config.sequential else collect_full
    t = time.perf_counter()
    stats = collect(model, windows, modules, batch_size=config.batch_size, device=device,
                    hessian=config.hessian, progress=progress)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings["stats_s"] = time.perf_counter() - t
    timings["tokens_per_s"] = windows.numel() / max(timings["stats_s"], 1e-9)

    t = time.perf_counter()
    weights = {n: weight_matrix(m).detach().to(device) for n, m in modules.items()}
    qparams = compute_qparams(weights, stats, config.formats, observer=config.observer,
                              method=config.weight_method, progress=progress)
    tables = {n: model.get_submodule(n).weight.detach().to(device)
              for n, i in layers.items() if i.kind == "embedding"}
    qparams.update(compute_embedding_qparams(tables, config.formats,
                                             method=config.weight_method))
    timings["qparams_s"] = time.perf_counter() - t

    record = replace(shape_only, versions=_versions(), timings=timings,
                     created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    analysis = None
    if analyse_it:
        t = time.perf_counter()
        model.to(device)
        analysis = analyse(model, record, stats, qparams, held_out, budget=budget,
                           rules=rules, device=device, progress=progress)
        timings["sensitivity_plan_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    record = replace(record, timings=timings)
    _write(run, record, stats_to_tensors(stats), qparams, overwrite, analysis)
    return record


def _outside_bytes(model, layers) -> dict:
    """fp16 bytes of the parameters besides the linear layers (the embedding table among
    them, which a plan may quantize), and whether the head is tied."""
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    planned = sum(i.in_features * i.out_features for n, i in layers.items()
                  if i.kind != "embedding" and not (tied and n == "lm_head"))
    total = sum(p.numel() for p in model.parameters())
    return {"other_param_bytes": 2 * (total - planned), "tied_lm_head": tied}


def _write(run: RunDir, record: RunRecord, stats: dict, qparams: dict, overwrite: bool,
           analysis: tuple | None) -> None:
    meta = {"model": record.config.model, "observer": record.config.observer,
            "weight_method": record.config.weight_method,
            "formats": ",".join(f.name for f in record.config.formats)}
    run.path.mkdir(parents=True, exist_ok=True)
    if overwrite:  # files made from the previous run no longer match this one
        for name in DOWNSTREAM:
            run.file(name).unlink(missing_ok=True)
    run.save_tensors(STATS, stats, kind=STAT_KIND, metadata=meta)
    run.save_tensors(QPARAMS, qparams, kind=QPARAMS_KIND, metadata=meta)
    if analysis is not None:
        write_analysis(run, *analysis)
    run.write_run(record)


def config_from_options(opts: dict) -> CalibrateConfig:
    """Build the config from CLI options (``formats`` as a comma-separated string)."""
    from quantcal.formats import parse_formats

    keys = set(CalibrateConfig.__dataclass_fields__)
    fields = {k: v for k, v in opts.items() if k in keys and v is not None}
    if isinstance(fields.get("formats"), str):
        fields["formats"] = parse_formats(fields["formats"])
    return replace(CalibrateConfig(model=fields.pop("model")), **fields)
