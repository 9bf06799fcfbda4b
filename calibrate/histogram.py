"""Fixed-range log2 activation histograms: accumulation on the device, and the read-out
math (CDF, percentiles, linear resampling) that the observers build on.

Owns the bin layout, which is fixed so that forward hooks never grow a range, never re-bin
and never synchronise with the host: bin ``i`` of ``bins`` counts ``|x|`` in
``[2**(LOG2_LO + i*w), 2**(LOG2_LO + (i+1)*w))`` with ``w = (LOG2_HI - LOG2_LO) / bins``;
values below the range (exact zeros included) go to bin 0, values above to the last bin.
Each layer keeps two such histograms: ``hist_pos`` (``x >= 0``) and ``hist_neg`` (``x < 0``,
binned by ``-x``).

Read-out model: within a bin, values are spread uniformly *in value space* over the bin's
*effective* interval, which is the bin's edges with bin 0 starting at 0 and everything
truncated at the side's observed maximum (the last bin is stretched up to it when the
maximum lies beyond ``2**LOG2_HI``). This makes the CDF of ``|x|`` piecewise linear, so
percentiles, resampling and expected errors are exact under that one assumption, and no
read-out ever reaches past the observed extremes. Read-out runs in float64.

Pure functions of tensors; nothing here holds state or reads files.
"""

from __future__ import annotations

import torch

HIST_BINS = 2048
LOG2_LO = -24.0
LOG2_HI = 16.0


def hist_edges(bins: int = HIST_BINS, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Bin edges in value space, ``(bins + 1,)``, from ``2**LOG2_LO`` to ``2**LOG2_HI``."""
    log2_edges = torch.linspace(LOG2_LO, LOG2_HI, bins + 1, dtype=torch.float64)
    return torch.exp2(log2_edges).to(dtype)


def bin_centres(bins: int = HIST_BINS, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Geometric centre of each bin, ``(bins,)``."""
    edges = hist_edges(bins, torch.float64)
    return (edges[:-1] * edges[1:]).sqrt().to(dtype)


def new_hist(
    device: torch.device | str = "cpu", bins: int = HIST_BINS, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """An empty histogram ``(bins,)``.

    Counts default to int64: a float32 count stops growing at ``2**24`` (adding 1 is lost),
    which one busy bin reaches within a few batches of a large model.
    """
    return torch.zeros(bins, dtype=dtype, device=device)


# Largest piece counted in one histc call: its float32 counts stay exact (<= 2**24).
_CHUNK = 1 << 24


def accumulate_hist_(hist_pos: torch.Tensor, hist_neg: torch.Tensor, x: torch.Tensor) -> None:
    """Add the values of ``x`` (any shape, any float dtype) to the two histograms, in place.

    Runs on ``x``'s device with no host synchronisation: bin indices are clamped rather
    than filtered, and one fixed-range ``torch.histc`` over ``2 * bins`` codes (negatives
    offset by ``bins``) counts both sides, so no output shape depends on the data. histc
    counts in shared memory on CUDA; per-element ``index_add_`` atomics into 2048 global
    bins were ~10x slower. Pieces of at most ``2**24`` values keep its float32 counts exact.
    NaNs are counted in neither histogram; ``+-inf`` land in the last bin of their side.

    Args:
        hist_pos, hist_neg: ``(bins,)`` counts on ``x``'s device (int64 or float64 advised).
        x: activations, any shape; computed in float32.
    """
    bins = hist_pos.shape[0]
    for piece in x.detach().reshape(-1).split(_CHUNK):
        xf = piece.float()  # (n,)
        idx = xf.abs().log2_().sub_(LOG2_LO).mul_(bins / (LOG2_HI - LOG2_LO))  # (n,) -inf at 0
        idx = idx.clamp_(0.0, float(bins - 1)).floor_().add_(0.5)  # centred in its histc bin
        code = idx.add_(xf < 0, alpha=bins)  # (n,) negatives in the upper half; NaN stays NaN
        counts = _count_codes(code, 2 * bins)  # (2*bins,)
        hist_pos.add_(counts[:bins].to(hist_pos.dtype))
        hist_neg.add_(counts[bins:].to(hist_neg.dtype))


def _count_codes(code: torch.Tensor, n: int) -> torch.Tensor:
    """float32 counts of codes ``k + 0.5`` for ``k`` in ``[0, n)``; NaN codes are skipped."""
    if code.is_cuda and torch.are_deterministic_algorithms_enabled():
        return _count_codes_index_add(code, n)  # CUDA histc refuses deterministic mode
    return torch.histc(code, bins=n, min=0.0, max=float(n))  # (n,)


def _count_codes_index_add(code: torch.Tensor, n: int) -> torch.Tensor:
    """:func:`_count_codes` through ``index_add_``: slower on CUDA, allowed when deterministic."""
    slot = torch.nan_to_num(code, nan=n + 0.5).long()  # (m,) NaN -> a spare slot n
    counts = code.new_zeros(n + 1).index_add_(0, slot, torch.ones_like(code))
    return counts[:n]


def side_cdf(hist: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Piecewise-linear CDF of one side's ``|x|``, from its histogram and observed maximum.

    Args:
        hist: ``(bins,)`` counts of one side.
        cap: the largest ``|x|`` seen on that side (``max(hi, 0)`` or ``max(-lo, 0)``).
    Returns:
        ``(knots, cdf)``, both ``(bins + 1,)`` float64 on ``hist``'s device: the effective
        edges (non-decreasing, ``knots[0] = 0``, all ``<= cap``) and the count at or below each.
    """
    bins = hist.shape[0]
    knots = hist_edges(bins).to(hist.device)
    knots[0] = 0.0
    knots[-1] = max(float(knots[-1]), cap)
    knots = knots.clamp(max=cap)
    cdf = torch.cat([hist.new_zeros(1, dtype=torch.float64), hist.double().cumsum(0)])
    return knots, cdf


def occupied_bins(
    hist: torch.Tensor, cap: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lower, upper, counts)``, each ``(B,)``: effective intervals of the non-empty bins."""
    knots, _ = side_cdf(hist, cap)
    keep = hist > 0
    return knots[:-1][keep], knots[1:][keep], hist[keep]


def interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """``np.interp`` for a non-decreasing ``xp`` that may repeat (a jump: right-continuous)."""
    n = xp.shape[0]
    idx = torch.searchsorted(xp, x, right=True).clamp(1, n - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    f0, f1 = fp[idx - 1], fp[idx]
    width = x1 - x0
    frac = torch.where(width > 0, (x - x0) / torch.where(width > 0, width, 1.0), 1.0)
    return f0 + frac.clamp(0.0, 1.0) * (f1 - f0)


def abs_cdf(
    hist_pos: torch.Tensor, hist_neg: torch.Tensor, pos_cap: float, neg_cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Piecewise-linear CDF of ``|x|`` over both sides, each truncated at its own maximum.

    Returns:
        ``(knots, cdf)``, ``(2 * bins + 2,)`` float64: the union of both sides' knots, on
        which the sum of the two (piecewise-linear) side CDFs is exact.
    """
    kp, cp = side_cdf(hist_pos, pos_cap)
    kn, cn = side_cdf(hist_neg, neg_cap)
    knots = torch.cat([kp, kn]).sort().values
    return knots, interp(knots, kp, cp) + interp(knots, kn, cn)


def cdf_quantile(knots: torch.Tensor, cdf: torch.Tensor, q: float) -> float:
    """The value below which a fraction ``q`` in [0, 1] of the mass lies (0 when empty)."""
    total = float(cdf[-1])
    if total <= 0:
        return 0.0
    target = torch.tensor([q * total], dtype=cdf.dtype, device=cdf.device)
    n = cdf.shape[0]
    i = int(torch.searchsorted(cdf, target).clamp(1, n - 1))
    c0, c1 = float(cdf[i - 1]), float(cdf[i])
    k0, k1 = float(knots[i - 1]), float(knots[i])
    frac = (float(target) - c0) / (c1 - c0) if c1 > c0 else 1.0
    return k0 + min(max(frac, 0.0), 1.0) * (k1 - k0)


def resample_linear(
    knots: torch.Tensor, cdf: torch.Tensor, top: float, n: int = HIST_BINS
) -> torch.Tensor:
    """Counts on ``n`` equal bins over ``[0, top]``, each log bin split by overlap.

    Mass above ``top`` is folded into the last bin, so the total is preserved.

    Returns:
        ``(n,)`` float64 counts.
    """
    grid = torch.linspace(0.0, top, n + 1, dtype=torch.float64, device=cdf.device)  # (n+1,)
    at = interp(grid, knots, cdf)
    at[0] = 0.0  # point masses at 0 belong to the first bin
    at[-1] = cdf[-1]
    return at.diff()  # (n,)


def abs_percentile(
    hist_pos: torch.Tensor, hist_neg: torch.Tensor, pct: float, pos_cap: float, neg_cap: float
) -> float:
    """The ``pct``-th percentile (0..100) of ``|x|``, interpolated within its bin."""
    knots, cdf = abs_cdf(hist_pos, hist_neg, pos_cap, neg_cap)
    return cdf_quantile(knots, cdf, pct / 100.0)
