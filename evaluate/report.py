"""``quantcal report``: a run directory as ``report.md``: the plan, its sensitivity plot and
(once evaluated) accuracy, size and speed against the baseline.

Reads ``run.json``, ``plan.json``, ``sensitivity.json``/``.png`` (and ``eval.json`` when
present), after checking that they belong together (:func:`quantcal.provenance.check_consistent`;
an evaluation of an earlier export of this run is refused too); writes ``report.md`` and its
plot as one transaction. Sections for files that are absent are left out.
"""

from __future__ import annotations

from pathlib import Path

from quantcal.config import Plan, RunRecord
from quantcal.errors import QuantcalError
from quantcal.provenance import check_consistent, onnx_digests
from quantcal.rundir import MODEL, PLAN, REPORT, RunDir, atomic_path, atomic_write_bytes
from quantcal.txn import Stage

ACCURACY_PNG = "accuracy_vs_size.png"


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


PRIMARY = {"hellaswag": "acc_norm", "gsm8k": "exact_match_flexible",
           "wikitext2": "perplexity", "c4": "perplexity"}


def _check_current(run: RunDir, record) -> None:
    """Refuse eval entries of this run's model.onnx that scored an earlier export."""
    for label, v in record.variants.items():
        if v.source == MODEL and (not run.has(MODEL) or v.made_from != onnx_digests(
                run.file(MODEL))):
            raise QuantcalError(f"eval.json's {label!r} scored an earlier export of "
                                f"{run.file(MODEL)}; re-run `quantcal eval --run {run.path}`")


def _eval_section(run: RunDir, folder: Path) -> list[str]:
    from quantcal.evaluate.evaluator import read_eval

    record = read_eval(run)
    if not record.variants:
        return []
    _check_current(run, record)
    labels = list(record.variants)
    lines = ["## Accuracy, size and speed", "",
             "| task | metric | " + " | ".join(labels) + " |",
             "| --- | --- |" + " ---: |" * len(labels)]
    rows = sorted({(t, m) for v in record.variants.values() for t, ms in v.metrics.items()
                   for m in ms if m != "scored_tokens"})
    for task, metric in rows:
        cells = []
        for lbl in labels:
            value = record.variants[lbl].metrics.get(task, {}).get(metric)
            cells.append("-" if value is None else f"{value[0]:.4f}" + (
                f" ± {value[1]:.4f}" if value[1] is not None else ""))
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    lines.append("| size | MB | " + " | ".join(
        f"{record.variants[lbl].size_bytes / 1e6:.1f}" for lbl in labels) + " |")
    for key, name in (("prefill_tok_s", "prefill tok/s"), ("decode_tok_s", "decode tok/s")):
        lines.append(f"| speed | {name} | " + " | ".join(
            f"{record.variants[lbl].speed[key]:,.0f}" if key in record.variants[lbl].speed
            else "-" for lbl in labels) + " |")
    docs = "; ".join(f"{t}: {n} docs" for t, n in next(iter(record.variants.values()))
                     .docs.items())
    lines += ["", f"Standard errors as lm-evaluation-harness computes them ({docs}).", ""]
    if _plot_accuracy_vs_size(record, folder / ACCURACY_PNG):
        lines += [f"![accuracy vs size]({ACCURACY_PNG})", ""]
    return lines


def _plot_accuracy_vs_size(record, path) -> bool:
    """One panel per task: its primary metric against model size, every variant a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in PRIMARY if any(t in v.metrics for v in record.variants.values())]
    if not tasks:
        return False
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), dpi=120,
                             squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric = PRIMARY[task]
        for label, v in record.variants.items():
            if task in v.metrics and metric in v.metrics[task]:
                value, err = v.metrics[task][metric]
                ax.errorbar(v.size_bytes / 1e6, value, yerr=err or 0, fmt="o", capsize=3,
                            label=label)
        ax.set_xlabel("model size (MB)")
        ax.set_ylabel(f"{task} {metric}" + (" (lower is better)" if metric == "perplexity"
                                            else ""))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def write_report(run: RunDir) -> str:
    """Write ``report.md`` (and its plot) into ``run`` and return its text."""
    check_consistent(run)
    with run.lock("report"):
        stage = Stage(run.path, "report")
        try:
            text = _write(run, stage.dir)
            stage.commit([REPORT, ACCURACY_PNG], remove=[ACCURACY_PNG])
        finally:
            stage.discard()
    return text


def _write(run: RunDir, folder: Path) -> str:
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
    lines += _eval_section(run, folder)
    text = "\n".join(lines)
    atomic_write_bytes(folder / REPORT, text.encode())
    return text
