"""Sensitivity, then a plan: the part of ``calibrate`` after the qparams, and ``quantcal plan``.

``analyse`` scores every layer (exact KL, with the fast proxy and its rank correlation, or
the proxy alone), solves the plan for the budget and measures the whole plan's KL on the
held-out windows. ``replan`` re-solves from an existing run directory's ``sensitivity.json``
under another budget (nothing is re-scored), measuring the new plan unless told not to.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from quantcal.calibrate.planner import Rules
from quantcal.calibrate.plans import make_plan, plan_kl
from quantcal.calibrate.plot import plot_sensitivity
from quantcal.calibrate.qparams import QPARAMS_KIND
from quantcal.calibrate.sensitivity import (
    exact_sensitivity, output_fisher, proxy_sensitivity, spearman,
)
from quantcal.calibrate.stats import LayerStats
from quantcal.config import Budget, Plan, RunRecord, SensitivityRecord
from quantcal.models import weight_matrix
from quantcal.rundir import PLAN, QPARAMS, SENSITIVITY, RunDir, atomic_write_json, read_record

SENSITIVITY_PNG = "sensitivity.png"


def analyse(model: nn.Module, record: RunRecord, stats: Mapping[str, LayerStats],
            qparams: Mapping[str, torch.Tensor], held_out: torch.Tensor, *, budget: Budget | None,
            rules: Rules, device: torch.device, progress: bool = True
            ) -> tuple[SensitivityRecord, Plan]:
    """Score every planned layer, then plan under ``budget`` and measure the plan's KL."""
    cfg = record.config
    layers = {n: i for n, i in record.layers.items() if i.kind != "embedding"}
    weights = {n: weight_matrix(model.get_submodule(n)).detach() for n in layers}
    t = time.perf_counter()
    fisher = output_fisher(model, held_out, list(layers), batch_size=cfg.batch_size,
                           device=device)
    proxy = proxy_sensitivity(weights, stats, cfg.formats, qparams, fisher)
    timings = {"proxy_s": time.perf_counter() - t}
    if cfg.sensitivity == "exact":
        t = time.perf_counter()
        exact = exact_sensitivity(model, held_out, layers, cfg.formats, qparams,
                                  batch_size=max(1, cfg.batch_size // len(cfg.formats)),
                                  device=device, progress=progress)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings["exact_s"] = time.perf_counter() - t
        sens = SensitivityRecord("exact", cfg.formats, exact, held_out.shape[0], cfg.seq_len,
                                 proxy=proxy, spearman=spearman(exact, proxy), timings=timings)
    else:
        sens = SensitivityRecord("fast", cfg.formats, proxy, held_out.shape[0], cfg.seq_len,
                                 timings=timings)
    plan = measured(make_plan(record, sens, budget, rules), model, qparams, held_out,
                    batch_size=cfg.batch_size, device=device)
    return sens, plan


def measured(plan: Plan, model: nn.Module, qparams: Mapping[str, torch.Tensor],
             held_out: torch.Tensor, *, batch_size: int, device: torch.device) -> Plan:
    """The plan with ``kl_measured``: all its layers quantized at once (errors interact)."""
    kl = plan_kl(model, plan, qparams, held_out, batch_size=batch_size, device=device)
    return replace(plan, kl_measured=kl)


def write_analysis(run: RunDir, sens: SensitivityRecord, plan: Plan,
                   plan_path: Path | None = None) -> None:
    atomic_write_json(run.file(SENSITIVITY), sens)
    plot_sensitivity(sens, run.file(SENSITIVITY_PNG), plan)
    run.write_plan(plan, plan_path)


def replan(run: RunDir, *, budget: Budget | None, rules: Rules, output: Path | None = None,
           measure: bool = True, progress: bool = True) -> Plan:
    """``quantcal plan``: a new plan from ``sensitivity.json``; measured unless ``measure``
    is False (measuring loads the model and the held-out windows again)."""
    record = run.read_run()
    sens = read_record(run.require(SENSITIVITY), SensitivityRecord, "quantcal calibrate")
    plan = make_plan(record, sens, budget, rules)
    if measure:
        plan = _measure_from_run(run, record, plan)
    run.write_plan(plan, output)
    if output is None or Path(output).resolve() == run.file(PLAN).resolve():
        plot_sensitivity(sens, run.file(SENSITIVITY_PNG), plan)
    return plan


def _measure_from_run(run: RunDir, record: RunRecord, plan: Plan) -> Plan:
    from quantcal.calibrate.data import load_calibration_data
    from quantcal.models import load_model, resolve_device, resolve_dtype

    cfg = record.config
    device = resolve_device(cfg.device)
    model, tokenizer = load_model(cfg.model, revision=cfg.revision,
                                  dtype=resolve_dtype(cfg.dtype, device), device=device)
    _, held = load_calibration_data(cfg.data, tokenizer, seq_len=cfg.seq_len,
                                    samples=cfg.samples, seed=cfg.seed,
                                    holdout=cfg.sensitivity_samples, text_field=cfg.text_field)
    qparams, _ = run.load_tensors(QPARAMS, QPARAMS_KIND)
    return measured(plan, model, qparams, held, batch_size=cfg.batch_size, device=device)
