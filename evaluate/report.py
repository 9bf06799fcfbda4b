"""``quantcal report``: a run directory as ``report.md``: the plan, its sensitivity plot and
(once evaluated) accuracy, size and speed against the baseline.

Reads ``run.json``, ``plan.json``, ``sensitivity.json``/``.png`` (and ``eval.json`` when
present); writes ``report.md`` atomically. Sections for files that are absent are left out.
"""

from __future__ import annotations

from quantcal.config import Plan, RunRecord
from quantcal.rundir import PLAN, REPORT, RunDir, atomic_write_bytes


def _plan_section(plan: Plan) -> list[str]:
    counts: dict[str, int] = {}
    for p in plan.layers.values():
        counts[p.format.name] = counts.get(p.format.name, 0) + 1
    kl = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
    lines = [
        "## Plan", "",
        f"Budget: `{plan.budget.kind}` = {plan.budget.value:g}. "
        f"Average {plan.totals.get('bits_per_weight', 0):.3f} bits per quantizable weight "
        "(scales and zero points counted); predicted model size "
        f"{plan.predicted_size_bytes / 1e6:.1f} MB.", "",
        "| format | layers |", "| --- | ---: |",
        *[f"| {f} | {n} |" for f, n in sorted(counts.items())], "",
        f"Whole-model KL to the FP model (nats/token): predicted (sum of layer scores) "
        f"{kl(plan.kl_predicted)}, measured (all layers quantized at once) "
        f"{kl(plan.kl_measured)}.", "",
        "Layers kept or forced by rules:", "",
    ]
    ruled = [(n, p) for n, p in plan.layers.items() if p.reason.startswith("rule")]
    lines += [f"- `{n}`: {p.format.name} ({p.reason})" for n, p in ruled] or ["- none"]
    return lines + [""]


def write_report(run: RunDir) -> str:
    """Write ``report.md`` into ``run`` and return its text."""
    record: RunRecord = run.read_run()
    cfg = record.config
    lines = [f"# quantcal report: {cfg.model}", "",
             f"Calibrated on {cfg.samples} x {cfg.seq_len} tokens of `{cfg.data}` "
             f"(seed {cfg.seed}, observer {cfg.observer}, weights {cfg.weight_method}"
             f"{', GPTQ' if cfg.hessian else ''}); candidate formats "
             f"{', '.join(f.name for f in cfg.formats)}.", ""]
    if run.has(PLAN):
        lines += _plan_section(run.read_plan())
    if run.has("sensitivity.png"):
        lines += ["## Layer sensitivity", "",
                  "Damage of each candidate format per layer (model order); circles mark the "
                  "plan's choice.", "", "![sensitivity](sensitivity.png)", ""]
    text = "\n".join(lines)
    atomic_write_bytes(run.file(REPORT), text.encode())
    return text
