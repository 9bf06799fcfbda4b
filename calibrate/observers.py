"""Activation observers: turn a layer's accumulated statistics into a clip range and qparams.

Owns the one observer contract and the registry of strategies. An observer is stateless:
it reads an :class:`ActivationSummary` (the two log2 histograms of :mod:`.histogram` plus
the running min and max, as written by the calibration hooks) and returns
``clip_range(summary, bits, symmetric) -> (clip_lo, clip_hi)``; ``qparams`` maps that range
through :func:`quantcal.qmath.range_qparams`, the only place scales are derived.

Strategies, looked up by name with :func:`get_observer`:

- ``minmax``: the observed ``(lo, hi)``; symmetric ``+-max(|lo|, |hi|)``.
- ``percentile``: symmetric clips at the ``p``-th percentile of ``|x|``. Asymmetric clips
  each side at the ``p``-th percentile of *that side's* magnitudes (``x >= 0`` for the top,
  ``-x`` of ``x < 0`` for the bottom), so a rare side is not clipped away wholesale.
- ``mse``: a grid of clip fractions of the range; the one with the least expected squared
  error (exact rounding error under a uniform-within-bin model, plus clipping error).
- ``entropy``: TensorRT-style KL calibration on ``|x|`` resampled onto linear bins.

For ``mse`` and ``entropy`` an asymmetric range is the zero-including observed range
``(min(lo, 0), max(hi, 0))`` shrunk by one common factor at both ends. Every range returned
lies within that zero-including observed range, and all-zero data gives ``(0, 0)``.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

import torch

from quantcal.errors import QuantcalError
from quantcal.qmath import code_range, range_qparams

from .histogram import (
    HIST_BINS,
    abs_cdf,
    cdf_quantile,
    occupied_bins,
    resample_linear,
    side_cdf,
)


@dataclass(frozen=True, eq=False)
class ActivationSummary:
    """What the observers read about one layer's input activations.

    Histograms are stored as CPU float64 whatever they arrive as (int64 counts on a GPU).

    Attributes:
        hist_pos: ``(bins,)`` counts of ``x >= 0`` by ``log2(x)``.
        hist_neg: ``(bins,)`` counts of ``x < 0`` by ``log2(-x)``.
        lo, hi: the running min and max of ``x``.
    """

    hist_pos: torch.Tensor
    hist_neg: torch.Tensor
    lo: float
    hi: float

    def __post_init__(self) -> None:
        pos = torch.as_tensor(self.hist_pos).detach().to("cpu", torch.float64).reshape(-1)
        neg = torch.as_tensor(self.hist_neg).detach().to("cpu", torch.float64).reshape(-1)
        if pos.shape != neg.shape:
            raise QuantcalError(
                f"hist_pos {tuple(pos.shape)} and hist_neg {tuple(neg.shape)} differ in size; "
                "the stats file is corrupted, rerun calibration"
            )
        lo, hi = float(self.lo), float(self.hi)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise QuantcalError(
                f"activation range [{lo}, {hi}] is not a finite range: the layer saw no "
                "calibration data or produced inf/NaN; check the model and the data"
            )
        object.__setattr__(self, "hist_pos", pos)
        object.__setattr__(self, "hist_neg", neg)
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)

    @property
    def pos_cap(self) -> float:
        """Largest ``x`` on the non-negative side (0 if none)."""
        return max(self.hi, 0.0)

    @property
    def neg_cap(self) -> float:
        """Largest ``-x`` on the negative side (0 if none)."""
        return max(-self.lo, 0.0)

    @property
    def absmax(self) -> float:
        return max(self.pos_cap, self.neg_cap)

    @property
    def count(self) -> float:
        return float(self.hist_pos.sum() + self.hist_neg.sum())


class Observer(abc.ABC):
    """The observer contract: a clip range from a summary, and qparams from that range."""

    name: ClassVar[str]

    def clip_range(
        self, summary: ActivationSummary, bits: int, symmetric: bool
    ) -> tuple[float, float]:
        """The real range ``(clip_lo, clip_hi)`` to quantize ``summary``'s activations onto.

        Args:
            summary: the layer's statistics.
            bits: code width (2..16).
            symmetric: whether the quantizer is symmetric (``clip_lo == -clip_hi``).
        """
        if not 2 <= bits <= 16:
            raise QuantcalError(f"activation bits must be between 2 and 16, got {bits}")
        if summary.absmax == 0.0:
            return 0.0, 0.0
        if summary.count == 0.0:  # no histogram (stats without one): nothing better than min/max
            return _minmax(summary, symmetric)
        return self._clip(summary, bits, symmetric)

    def qparams(
        self, summary: ActivationSummary, bits: int, symmetric: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero)`` as 0-d float32 tensors, via :func:`quantcal.qmath.range_qparams`."""
        lo, hi = self.clip_range(summary, bits, symmetric)
        return range_qparams(torch.tensor(lo), torch.tensor(hi), bits, symmetric)

    @abc.abstractmethod
    def _clip(self, summary: ActivationSummary, bits: int, symmetric: bool) -> tuple[float, float]:
        """The clip range of a summary with samples and a non-zero range."""


def _minmax(summary: ActivationSummary, symmetric: bool) -> tuple[float, float]:
    if symmetric:
        return -summary.absmax, summary.absmax
    return summary.lo, summary.hi


@dataclass(frozen=True)
class MinMaxObserver(Observer):
    """The observed extremes, exactly."""

    name: ClassVar[str] = "minmax"

    def _clip(self, summary: ActivationSummary, bits: int, symmetric: bool) -> tuple[float, float]:
        return _minmax(summary, symmetric)


@dataclass(frozen=True)
class PercentileObserver(Observer):
    """Clip at the ``percentile``-th percentile of ``|x|`` (per side when asymmetric)."""

    name: ClassVar[str] = "percentile"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if not 0.0 < self.percentile <= 100.0:
            raise QuantcalError(f"percentile must be in (0, 100], got {self.percentile}")

    def _clip(self, summary: ActivationSummary, bits: int, symmetric: bool) -> tuple[float, float]:
        q = self.percentile / 100.0
        if symmetric:
            t = cdf_quantile(*abs_cdf(summary.hist_pos, summary.hist_neg,
                                      summary.pos_cap, summary.neg_cap), q)
            t = min(t, summary.absmax)
            return -t, t
        top = cdf_quantile(*side_cdf(summary.hist_pos, summary.pos_cap), q)
        bottom = cdf_quantile(*side_cdf(summary.hist_neg, summary.neg_cap), q)
        return -min(bottom, summary.neg_cap), min(top, summary.pos_cap)


def _base_range(summary: ActivationSummary, symmetric: bool) -> tuple[float, float]:
    """The range that mse and entropy shrink: ``+-absmax``, or the zero-including range."""
    if symmetric:
        return -summary.absmax, summary.absmax
    return min(summary.lo, 0.0), max(summary.hi, 0.0)


def _sawtooth_integral(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """An antiderivative of the squared rounding error ``(t - scale*round(t/scale))**2``."""
    u = x / scale + 0.5
    whole = torch.floor(u)
    frac = u - whole
    return scale**3 * (whole / 12.0 + ((frac - 0.5) ** 3 + 0.125) / 3.0)


def side_sq_error(
    lower: torch.Tensor,
    upper: torch.Tensor,
    counts: torch.Tensor,
    limit: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """Summed squared quantization error of one side's magnitudes, for each candidate.

    Values in a bin are uniform over ``[lower, upper]``; those up to ``limit`` get the
    rounding error of step ``scale``, those above are clamped to ``limit``. Zero-width bins
    are point masses.

    Args:
        lower, upper, counts: ``(B,)`` bins (:func:`.histogram.occupied_bins`).
        limit, scale: ``(C,)`` largest representable magnitude on this side, and the step.
    Returns:
        ``(C,)`` float64 sums of squared errors.
    """
    limit, scale = limit[:, None].double(), scale[:, None].double()  # (C, 1)
    a_in, b_in = torch.minimum(lower, limit), torch.minimum(upper, limit)  # (C, B)
    rounding = _sawtooth_integral(b_in, scale) - _sawtooth_integral(a_in, scale)
    a_out, b_out = torch.maximum(lower, limit), torch.maximum(upper, limit)  # (C, B)
    clipping = ((b_out - limit) ** 3 - (a_out - limit) ** 3) / 3.0
    width = upper - lower  # (B,)
    spread = (rounding + clipping) / torch.where(width > 0, width, 1.0)
    point = torch.where(lower <= limit, lower - scale * torch.round(lower / scale), lower - limit)
    return (torch.where(width > 0, spread, point**2) * counts).sum(-1)  # (C,)


@dataclass(frozen=True)
class MseObserver(Observer):
    """Least expected squared error over ``grid`` clip fractions ``k / grid`` of the range."""

    name: ClassVar[str] = "mse"
    grid: int = 200

    def __post_init__(self) -> None:
        if self.grid < 1:
            raise QuantcalError(f"the mse observer needs grid >= 1, got {self.grid}")

    def _clip(self, summary: ActivationSummary, bits: int, symmetric: bool) -> tuple[float, float]:
        base_lo, base_hi = _base_range(summary, symmetric)
        frac = torch.arange(1, self.grid + 1, dtype=torch.float64) / self.grid  # (C,)
        lo, hi = frac * base_lo, frac * base_hi  # (C,)
        scale, zero = range_qparams(lo, hi, bits, symmetric)  # (C,) float32
        scale, zero = scale.double(), zero.double()
        qmax = code_range(bits)[1]
        pos = occupied_bins(summary.hist_pos, summary.pos_cap)
        neg = occupied_bins(summary.hist_neg, summary.neg_cap)
        err = side_sq_error(*pos, scale * (qmax - zero), scale)
        err = err + side_sq_error(*neg, scale * zero, scale)  # (C,)
        best = int(torch.argmin(err))
        return float(lo[best]), float(hi[best])


def kl_divergences(hist: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TensorRT's KL(P || Q) for every threshold bin count ``i`` in ``[levels, n]``.

    For each ``i``: P is the first ``i`` bins with all later mass folded into bin ``i - 1``;
    Q quantizes the first ``i`` bins (without the fold) onto ``levels`` groups, bin ``j`` in
    group ``floor(j * levels / i)``, and spreads each group's mass evenly over its non-empty
    bins. Both are normalised; ``P > 0`` where ``Q == 0`` gives ``inf``.

    Group sums come from prefix sums, so the cost is ``O(candidates * levels)``, not
    ``O(candidates * n)``.

    Args:
        hist: ``(n,)`` counts on linear bins starting at 0.
        levels: number of quantization levels on ``[0, threshold]``.
    Returns:
        ``(thresholds (C,), kl (C,))``: the candidate bin counts ``i`` and their divergences.
    """
    h = hist.double()
    zero = h.new_zeros(1)
    total = h.sum()
    csum = torch.cat([zero, h.cumsum(0)])  # (n+1,) mass of bins [0, k)
    clogs = torch.cat([zero, torch.where(h > 0, h * h.log(), 0.0).cumsum(0)])  # (n+1,)
    cnz = torch.cat([zero, (h > 0).double().cumsum(0)])  # (n+1,) non-empty bins in [0, k)
    i = torch.arange(levels, h.shape[0] + 1, device=h.device)  # (C,)
    g = torch.arange(levels + 1, device=h.device)  # (L+1,)
    bounds = (g * i[:, None] + levels - 1) // levels  # (C, L+1) group g is [b_g, b_g+1)
    mass = csum[bounds].diff(dim=1)  # (C, L)
    nonempty = cnz[bounds].diff(dim=1)  # (C, L)
    kept = csum[i]  # (C,) mass of the first i bins
    q_group = mass / (nonempty.clamp_min(1.0) * kept.clamp_min(1e-300)[:, None])  # (C, L)
    last = h[i - 1]  # (C,) bin i-1, the last kept bin, always in group L-1
    mass_before_last = mass.clone()
    mass_before_last[:, -1] -= last
    cross = torch.where(mass_before_last > 0, mass_before_last * q_group.log(), 0.0).sum(1)
    body = (clogs[i - 1] - csum[i - 1] * total.log() - cross) / total  # (C,) bins j < i-1
    p_last = (last + (total - kept).clamp_min(0.0)) / total  # (C,) with the folded outliers
    tail = p_last * (p_last.log() - q_group[:, -1].log())
    tail = torch.where(last > 0, tail, torch.where(p_last > 0, torch.inf, 0.0))
    return i, body + tail


def entropy_threshold_bin(hist: torch.Tensor, levels: int) -> int:
    """The KL-minimising threshold bin count ``i`` (the largest among ties), as TensorRT."""
    n = hist.shape[0]
    if levels > n:
        raise QuantcalError(
            f"the entropy observer needs at least as many bins as levels ({levels}); "
            f"got bins={n}: raise bins or lower the bit width"
        )
    cands, kl = kl_divergences(hist, levels)
    last = len(kl) - 1 - int(torch.argmin(kl.flip(0)))
    return int(cands[last])


@dataclass(frozen=True)
class EntropyObserver(Observer):
    """TensorRT-style KL calibration on ``|x|`` resampled onto ``bins`` linear bins.

    Symmetric: ``2**(bits-1)`` levels over ``[0, t]``. Asymmetric: the levels that the
    zero-including range's step would put on ``[0, absmax]`` (``2**(bits-1)`` for balanced
    data up to ``2**bits - 1`` for one-sided data), and the resulting ratio ``t / absmax``
    shrinks both ends.
    """

    name: ClassVar[str] = "entropy"
    bins: int = HIST_BINS

    def __post_init__(self) -> None:
        if self.bins < 2:
            raise QuantcalError(f"the entropy observer needs bins >= 2, got {self.bins}")

    def _clip(self, summary: ActivationSummary, bits: int, symmetric: bool) -> tuple[float, float]:
        absmax = summary.absmax
        base_lo, base_hi = _base_range(summary, symmetric)
        levels = 1 << (bits - 1)
        if not symmetric:
            full = (1 << bits) - 1
            levels = min(max(round(full * absmax / (base_hi - base_lo)), levels), full)
        knots, cdf = abs_cdf(summary.hist_pos, summary.hist_neg, summary.pos_cap, summary.neg_cap)
        lin = resample_linear(knots, cdf, absmax, self.bins)  # (bins,)
        ratio = entropy_threshold_bin(lin, levels) / self.bins
        return ratio * base_lo, ratio * base_hi


_OBSERVERS: MappingProxyType[str, type[Observer]] = MappingProxyType(
    {cls.name: cls for cls in (MinMaxObserver, PercentileObserver, MseObserver, EntropyObserver)}
)
OBSERVER_NAMES: tuple[str, ...] = tuple(_OBSERVERS)


def get_observer(name: str, **options: object) -> Observer:
    """The observer registered as ``name``, built with its ``options`` (e.g. ``percentile=99.9``).

    Raises:
        QuantcalError: unknown name, or an option that observer does not take.
    """
    cls = _OBSERVERS.get(name)
    if cls is None:
        raise QuantcalError(
            f"unknown observer {name!r}; choose one of: {', '.join(OBSERVER_NAMES)}"
        )
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        takes = ", ".join(sorted(known)) or "no options"
        raise QuantcalError(f"observer {name!r} takes {takes}; got unknown {', '.join(unknown)}")
    return cls(**options)
