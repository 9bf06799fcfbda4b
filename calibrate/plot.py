"""``sensitivity.png``: every layer's score per format, layers in model order, so the
fragile blocks stand out. Written atomically; matplotlib's Agg backend (no display)."""

from __future__ import annotations

from pathlib import Path

from quantcal.config import Plan, SensitivityRecord
from quantcal.rundir import atomic_path


def plot_sensitivity(sens: SensitivityRecord, path: Path, plan: Plan | None = None) -> None:
    """Scores per layer (log scale), one series per format; the plan's pick is circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(sens.scores)
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.06 + 4), 4.5), dpi=120)
    for fmt in sens.formats:
        ys = [max(sens.scores[n][fmt.name], 1e-12) for n in names]
        ax.plot(xs, ys, marker=".", linewidth=0.8, markersize=4, label=fmt.name)
    if plan is not None:
        picked = [(i, sens.scores[n][p.format.name]) for i, n in enumerate(names)
                  if (p := plan.layers.get(n)) and p.format.name in sens.scores[n]]
        if picked:
            ax.scatter([i for i, _ in picked], [max(y, 1e-12) for _, y in picked],
                       facecolors="none", edgecolors="black", s=30, linewidths=0.7,
                       label="plan's choice", zorder=3)
    blocks = _block_starts(names)
    for i, _ in blocks:
        ax.axvline(i - 0.5, color="0.85", linewidth=0.5, zorder=0)
    step = max(1, len(blocks) // 16)
    ax.set_xticks([i for i, _ in blocks[::step]], [b for _, b in blocks[::step]], fontsize=7)
    ax.set_yscale("log")
    unit = "mean KL (nats/token)" if sens.method == "exact" else "Fisher proxy score (not KL)"
    ax.set_ylabel(f"damage: {unit}")
    ax.set_xlabel("layer (model order; ticks mark decoder blocks)")
    ax.set_title(f"Layer sensitivity ({sens.method}, {sens.samples} held-out windows)")
    ax.legend(fontsize=8, loc="upper left", ncols=len(sens.formats) + 1)
    ax.grid(True, axis="y", which="major", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _block_starts(names: list[str]) -> list[tuple[int, str]]:
    """(index, label) where each decoder block (or the head) starts."""
    out, last = [], None
    for i, n in enumerate(names):
        parts = n.split(".")
        label = next((p for p in parts if p.isdigit()), parts[-1])
        if label != last:
            out.append((i, label))
            last = label
    return out
