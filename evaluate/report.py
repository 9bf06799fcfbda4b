"""``quantcal report``: a run directory as ``report.md``: the plan, its sensitivity plot and
(once evaluated) accuracy, size and speed against the baseline.

Reads ``run.json``, ``plan.json``, ``sensitivity.json``/``.png`` (and ``eval.json`` when
present), after checking that they belong together (:func:`quantcal.provenance.check_consistent`;
an evaluation of an earlier export of this run is refused too); writes ``report.md`` and its
plot as one transaction. Sections for files that are absent are left out.
"""

from __future__ import annotations

from pathlib import Path

from quantcal.config import Plan, RunRecord, SensitivityRecord
from quantcal.errors import QuantcalError
from quantcal.provenance import check_consistent, onnx_digests
from quantcal.rundir import (
    MODEL, PLAN, REPORT, SENSITIVITY, RunDir, atomic_path, atomic_write_bytes, read_record,
)
from quantcal.txn import Stage

ACCURACY_PNG = "accuracy_vs_size.png"


def _predicted_damage(plan: Plan) -> str:
    """The plan's damage, in the units its sensitivity has: KL (exact) or a proxy score."""
    value = "n/a" if plan.kl_predicted is None else f"{plan.kl_predicted:.4g}"
    measured = ("not measured" if plan.kl_measured is None else
                f"{plan.kl_measured:.4g} nats/token, all layers quantized at once, on "
                f"{plan.measure_windows} held-out windows none of which scored a layer")
    if plan.predicted_by == "exact":
        return (f"Whole-model KL to the FP model: predicted (sum of layer KLs, on "
                f"{plan.score_windows} held-out windows) {value} nats/token; measured "
                f"{measured}.")
    return (f"Predicted damage: proxy score (Fisher, not KL) {value}, the sum of the layers' "
            f"scores on {plan.score_windows} held-out windows. KL to the FP model measured "
            f"{measured}.")


def _plan_section(plan: Plan) -> list[str]:
    counts: dict[str, int] = {}
    for p in plan.layers.values():
        counts[p.format.name] = counts.get(p.format.name, 0) + 1
    head = (" A tied lm_head stored with the embedding table counts 0 bits."
            if plan.totals.get("lm_head_shares_embedding") else "")
    lines = [
        "## Plan", "",
        f"Budget: `{plan.budget.kind}` = {plan.budget.value:g}. "
        f"Average {plan.totals.get('bits_per_weight', 0):.3f} bits per quantizable weight "
        f"(scales and zero points counted).{head} Predicted model size: "
        f"{plan.predicted_size_bytes / 1e6:.1f} MB exported for CUDA (`--provider cuda`, fp16), "
        f"{plan.predicted_size_fp32_bytes / 1e6:.1f} MB for CPU (`--provider cpu`, the "
        "unquantized parts and scales in fp32).", "",
        "| format | layers |", "| --- | ---: |",
        *[f"| {f} | {n} |" for f, n in sorted(counts.items())], "",
        _predicted_damage(plan), "",
        *_uniform_rows(plan),
        "Layers kept or forced by rules:", "",
    ]
    ruled = [(n, p) for n, p in plan.layers.items() if p.reason.startswith("rule")]
    lines += [f"- `{n}`: {p.format.name} ({p.reason})" for n, p in ruled] or ["- none"]
    return lines + [""]


def _uniform_rows(plan: Plan) -> list[str]:
    """The uniform plans no larger than the mixed one, measured on the same windows
    (calibrate/uniform.py), and which plan was kept."""
    if not plan.uniform:
        return []
    kept = ("the mixed plan" if plan.choice == "mixed" else
            f"the {plan.choice} plan, which measured better than the mixed one")
    rows = [f"Against uniform plans no larger than it (same held-out windows), {kept} was "
            "kept:", "", "| plan | bits/weight | size (MB) | KL measured | / kept plan's |",
            "| --- | ---: | ---: | ---: | ---: |"]
    own = {"bits_per_weight": plan.totals.get("bits_per_weight", 0.0),
           "size_bytes": float(plan.predicted_size_bytes), "kl_measured": plan.kl_measured}
    entries = {plan.choice: own, **{k: v for k, v in plan.uniform.items()
                                    if k != plan.choice.removeprefix("uniform ")}}
    for name, f in entries.items():
        ratio = (f["kl_measured"] / plan.kl_measured if plan.kl_measured else float("nan"))
        rows.append(f"| {name} | {f['bits_per_weight']:.3f} | {f['size_bytes'] / 1e6:.2f} | "
                    f"{f['kl_measured']:.4g} | {ratio:.2f}x |")
    return rows + [""]


def _sensitivity_section(run: RunDir) -> list[str]:
    """The plot, and how well the Fisher proxy ranks layers like the exact KL, per format."""
    lines = ["## Layer sensitivity", ""]
    if run.has(SENSITIVITY):
        sens = read_record(run.file(SENSITIVITY), SensitivityRecord)
        if sens.method == "fast":
            lines += ["Scores are the Fisher proxy (fast), not KL.", ""]
        if sens.spearman_per_format:
            cell = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
            lines += ["Fisher proxy against exact KL, Spearman rank correlation across "
                      f"layers ({len(sens.scores)} layers, {sens.samples} held-out windows):",
                      "", "| format | Spearman |", "| --- | ---: |",
                      *[f"| {f} | {cell(v)} |" for f, v in sens.spearman_per_format.items()]]
            if sens.spearman is not None:
                lines.append(f"| pooled over formats (inflated by format alone) | "
                             f"{sens.spearman:.3f} |")
            lines.append("")
    if run.has("sensitivity.png"):
        lines += ["Damage of each candidate format per layer (model order); circles mark the "
                  "plan's choice.", "", "![sensitivity](sensitivity.png)", ""]
    return lines if len(lines) > 2 else []


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
    lines += ["", *_error_notes(record), ""]
    unlike = sorted({f"{t} is {p}" for v in record.variants.values()
                     for t, p in v.protocols.items() if p.startswith("lm-eval-like")})
    if unlike:  # e.g. HellaSwag from the local file, whose ctx_b cannot be capitalised
        lines += ["Not built exactly as lm-evaluation-harness: " + "; ".join(unlike) + ".", ""]
    if _plot_accuracy_vs_size(record, folder / ACCURACY_PNG):
        lines += [f"![accuracy vs size]({ACCURACY_PNG})", ""]
    return lines


def _error_notes(record) -> list[str]:
    """What each task counted (documents; perplexity: windows and tokens) and how its
    standard errors were computed."""
    from quantcal.evaluate.tasks.perplexity import STDERR_METHOD

    first = next(iter(record.variants.values()))
    units, ppl = [], False
    for task, n in first.docs.items():
        tokens = first.metrics.get(task, {}).get("scored_tokens")
        if tokens is not None:
            ppl = True
            units.append(f"{task}: {n} windows, {tokens[0]:,.0f} scored tokens")
        else:
            units.append(f"{task}: {n} documents")
    notes = [f"Counted: {'; '.join(units)}.", "",
             "Standard errors: accuracies as lm-evaluation-harness computes them (sample "
             "standard deviation over documents / sqrt(n))."]
    if ppl:
        notes[-1] += f" Perplexity: {STDERR_METHOD}."
    return notes


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
    lines += _sensitivity_section(run)
    lines += _eval_section(run, folder)
    text = "\n".join(lines)
    atomic_write_bytes(folder / REPORT, text.encode())
    return text
