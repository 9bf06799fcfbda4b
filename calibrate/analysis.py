"""Sensitivity, then a plan: the part of ``calibrate`` after the qparams, and ``quantcal plan``.

``score`` scores every layer (exact KL, with the fast proxy and its rank correlation per
format, or the proxy alone) on the first ``--sensitivity-samples`` held-out windows;
``measured`` gives a plan its whole-model KL on as many *other* held-out windows (a plan
optimised on the scoring windows would read low on them): :func:`split_held_out`.
Both write into the folder they are given (calibration's staging folder). ``replan``
re-solves from an existing run directory's ``sensitivity.json`` under another budget
(nothing is re-scored), after checking that sensitivity.json, qparams and run.json belong
together, and commits plan.json with its plot as one transaction.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from quantcal.calibrate.planner import Rules
from quantcal.calibrate.plans import make_plan, plans_kl
from quantcal.calibrate.plot import plot_sensitivity
from quantcal.calibrate.qparams import QPARAMS_KIND
from quantcal.calibrate.sensitivity import (
    exact_sensitivity, output_fisher, proxy_sensitivity, spearman, spearman_per_format,
)
from quantcal.calibrate.speed import SpeedOptions
from quantcal.calibrate.stats import LayerStats
from quantcal.calibrate.uniform import rivals, settle
from quantcal.config import Budget, Plan, RunRecord, SensitivityRecord
from quantcal.models import weight_matrix
from quantcal.errors import QuantcalError
from quantcal.provenance import check_model_unchanged, sha256_file
from quantcal.rundir import (
    PLAN, QPARAMS, RUN_JSON, SENSITIVITY, RunDir, atomic_write_json, read_record,
)
from quantcal.txn import Stage

SENSITIVITY_PNG = "sensitivity.png"
HELD_OUT_SETS = 2  # held-out windows to ask for, in units of --sensitivity-samples


def split_held_out(held_out: torch.Tensor, scoring: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, L)`` held-out windows -> the first ``scoring`` (they score the layers) and the
    next ``scoring`` (they measure the plan: disjoint from those it was optimised on)."""
    if held_out.shape[0] < HELD_OUT_SETS * scoring:
        raise QuantcalError(f"{held_out.shape[0]} held-out windows: scoring and measuring "
                            f"need {HELD_OUT_SETS} x {scoring}; lower --sensitivity-samples "
                            "or pass more text with --data PATH")
    return held_out[:scoring], held_out[scoring:HELD_OUT_SETS * scoring]


def score(model: nn.Module, record: RunRecord, stats: Mapping[str, LayerStats],
          qparams: Mapping[str, torch.Tensor], held_out: torch.Tensor, *,
          device: torch.device, progress: bool = True) -> SensitivityRecord:
    """Score every planned layer on ``held_out`` (the scoring windows of
    :func:`split_held_out`): the exact KL (with the fast proxy and its rank correlation
    beside it), or the proxy alone."""
    cfg = record.config
    layers = {n: i for n, i in record.layers.items() if i.kind != "embedding"}
    weights = {n: weight_matrix(model.get_submodule(n)).detach() for n in layers}
    t = time.perf_counter()
    fisher = output_fisher(model, held_out, list(layers), batch_size=cfg.batch_size,
                           device=device, progress=progress)
    proxy = proxy_sensitivity(weights, stats, cfg.formats, qparams, fisher)
    timings = {"proxy_s": time.perf_counter() - t}
    if cfg.sensitivity != "exact":
        return SensitivityRecord("fast", cfg.formats, proxy, held_out.shape[0], cfg.seq_len,
                                 timings=timings, measure_samples=held_out.shape[0])
    t = time.perf_counter()
    exact = exact_sensitivity(model, held_out, layers, cfg.formats, qparams,
                              batch_size=max(1, cfg.batch_size // len(cfg.formats)),
                              device=device, progress=progress)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings["exact_s"] = time.perf_counter() - t
    return SensitivityRecord("exact", cfg.formats, exact, held_out.shape[0], cfg.seq_len,
                             proxy=proxy, spearman=spearman(exact, proxy),
                             spearman_per_format=spearman_per_format(exact, proxy),
                             timings=timings, measure_samples=held_out.shape[0])


def measured(plan: Plan, model: nn.Module, qparams: Mapping[str, torch.Tensor],
             held_out: torch.Tensor, *, batch_size: int, device: torch.device,
             rival_plans: dict[str, Plan] | None = None) -> Plan:
    """The plan with ``kl_measured``: all its layers quantized at once (errors interact), on
    ``held_out``: the measuring windows of :func:`split_held_out`, none of which scored.
    ``rival_plans`` (:func:`quantcal.calibrate.uniform.rivals`): measured alike, the plan
    gives way to one whose KL is lower (:func:`quantcal.calibrate.uniform.settle`)."""
    rival_plans = rival_plans or {}
    kl, *rival_kls = plans_kl(model, [plan, *rival_plans.values()], qparams, held_out,
                              batch_size=batch_size, device=device)
    plan = replace(plan, kl_measured=kl, measure_windows=held_out.shape[0])
    return settle(plan, rival_plans, dict(zip(rival_plans, rival_kls)))


def write_sensitivity(folder: Path, sens: SensitivityRecord) -> None:
    atomic_write_json(folder / SENSITIVITY, sens)


def write_plan(folder: Path, sens: SensitivityRecord, plan: Plan,
               plan_path: Path | None = None) -> None:
    """``plan.json`` (or ``plan_path``) and ``sensitivity.png`` marking its choices."""
    atomic_write_json(plan_path or folder / PLAN, plan)
    if plan_path is None:
        plot_sensitivity(sens, folder / SENSITIVITY_PNG, plan)


def _checked_inputs(run: RunDir, record: RunRecord) -> tuple[SensitivityRecord, str]:
    """sensitivity.json and the qparams digest, refused unless they belong to run.json."""
    qdigest = sha256_file(run.require(QPARAMS))
    remedy = "re-run `quantcal calibrate` on this run directory"
    if record.files.get(QPARAMS) != qdigest:
        raise QuantcalError(f"{run.file(RUN_JSON)} and {QPARAMS} are from different "
                            f"calibrations; {remedy}")
    sens = read_record(run.require(SENSITIVITY), SensitivityRecord, "quantcal calibrate")
    if sens.made_from.get(QPARAMS) != qdigest:
        raise QuantcalError(f"{run.file(SENSITIVITY)} scored other qparams than "
                            f"{run.file(QPARAMS)}; {remedy}")
    return sens, qdigest


def replan(run: RunDir, *, budget: Budget | None, rules: Rules, output: Path | None = None,
           measure: bool = True, data: str | None = None, progress: bool = True,
           speed: SpeedOptions | None = None) -> Plan:
    """``quantcal plan``: a new plan from ``sensitivity.json`` (under ``speed``'s goals and
    table, see :func:`make_plan`); measured unless ``measure`` is False (measuring loads
    the model and the held-out windows again, from the data source run.json records, or
    from ``data``). The run's own plan.json is replaced as one transaction with its
    sensitivity.png."""
    record = run.read_run()
    sens, qdigest = _checked_inputs(run, record)
    plan = replace(make_plan(record, sens, budget, rules, speed), made_from={QPARAMS: qdigest})
    own = output is None or Path(output).resolve() == run.file(PLAN).resolve()
    with run.lock("plan"):
        if measure:
            check_model_unchanged(record.config.model, record.config.revision,
                                  record.model_files, str(run.file(RUN_JSON)))
            plan = _measure_from_run(run, record, plan, data,
                                     rivals(record, sens, plan, rules))
        if not own:
            atomic_write_json(output, plan)
            return plan
        stage = Stage(run.path, "plan")
        try:
            write_plan(stage.dir, sens, plan)
            stage.commit([PLAN, SENSITIVITY_PNG])
        finally:
            stage.discard()
    return plan


def _measure_from_run(run: RunDir, record: RunRecord, plan: Plan, data: str | None,
                      rival_plans: dict[str, Plan]) -> Plan:
    from quantcal.calibrate.awq import apply_awq_
    from quantcal.calibrate.data import recorded_windows
    from quantcal.models import load_model, resolve_device, resolve_dtype

    cfg = record.config
    device = resolve_device(cfg.device)
    model, tokenizer = load_model(cfg.model, revision=cfg.revision,
                                  trust_remote_code=cfg.trust_remote_code,
                                  dtype=resolve_dtype(cfg.dtype, device), device=device)
    _, held = recorded_windows(record, tokenizer,
                               holdout=HELD_OUT_SETS * cfg.sensitivity_samples, data=data)
    qparams, _ = run.load_tensors(QPARAMS, QPARAMS_KIND)
    apply_awq_(model, qparams)  # a --awq run's qparams are those of the scaled model
    _, measure_on = split_held_out(held, cfg.sensitivity_samples)
    return measured(plan, model, qparams, measure_on, batch_size=cfg.batch_size, device=device,
                    rival_plans=rival_plans)
