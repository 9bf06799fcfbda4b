"""Tests of quantcal.calibrate.observers, each observer against a reference computed
directly on the raw samples with numpy: exact min/max, np.percentile, a brute-force MSE
search, and a plain-loop TensorRT KL calibration on np.histogram."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from quantcal.calibrate.histogram import HIST_BINS, LOG2_HI, LOG2_LO, accumulate_hist_, new_hist
from quantcal.calibrate.observers import (
    OBSERVER_NAMES,
    ActivationSummary,
    EntropyObserver,
    MseObserver,
    PercentileObserver,
    entropy_threshold_bin,
    get_observer,
    kl_divergences,
)
from quantcal.errors import QuantcalError
from quantcal.qmath import fake_quant, range_qparams

LOG_BIN = 2.0 ** ((LOG2_HI - LOG2_LO) / HIST_BINS) - 1  # relative width of one log bin


def summarize(x: np.ndarray, batches: int = 3) -> ActivationSummary:
    """What the hooks would record for ``x``, accumulated over a few batches."""
    t = torch.from_numpy(np.asarray(x, dtype=np.float32))
    hp, hn = new_hist(), new_hist()
    for part in t.chunk(batches):
        accumulate_hist_(hp, hn, part)
    return ActivationSummary(hp, hn, float(t.min()), float(t.max()))


def raw_mse(x: np.ndarray, lo: float, hi: float, bits: int, symmetric: bool) -> float:
    t = torch.from_numpy(np.asarray(x, dtype=np.float32))
    scale, zero = range_qparams(torch.tensor(lo), torch.tensor(hi), bits, symmetric)
    return float(((fake_quant(t, scale, zero, bits).double() - t.double()) ** 2).mean())


def samples(kind: str, n: int = 50_000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gauss":
        x = rng.standard_normal(n)
    elif kind == "t3":
        x = rng.standard_t(3, n)
    elif kind == "outliers":
        x = np.concatenate([rng.standard_normal(n), [25.0, -18.0, 31.0, 12.0]])
    elif kind == "exp":
        x = rng.exponential(size=n)
    elif kind == "shifted":
        x = rng.normal(1.5, 1.0, n)
    else:
        raise ValueError(kind)
    return x.astype(np.float32)


def quasi_samples(dist: scipy.stats.rv_continuous, n: int) -> np.ndarray:
    """Stratified samples ``ppf((k + 1/2) / n)``: raw samples without sampling noise."""
    return dist.ppf((np.arange(n) + 0.5) / n).astype(np.float32)


# ---------------------------------------------------------------- reference TensorRT KL


def reference_kl(hist: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """TensorRT / pytorch-quantization entropy calibration, one candidate at a time."""
    hist = np.asarray(hist, dtype=np.float64)
    cands = np.arange(levels, len(hist) + 1)
    kl = np.empty(len(cands))
    for k, i in enumerate(cands):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()  # outliers fold into the last bin
        group = np.digitize(np.arange(i), np.linspace(0, i, levels + 1)) - 1
        mass = np.bincount(group, weights=hist[:i], minlength=levels)
        nonempty = np.bincount(group, weights=hist[:i] > 0, minlength=levels)
        q = np.where(hist[:i] > 0, mass[group] / np.maximum(nonempty[group], 1), 0.0)
        p, q = p / p.sum(), q / q.sum()
        with np.errstate(divide="ignore", invalid="ignore"):  # p > 0 == q gives inf
            kl[k] = np.sum(np.where(p > 0, p * np.log(p / q), 0.0))
    return cands, kl


def reference_threshold_bin(hist: np.ndarray, levels: int) -> int:
    cands, kl = reference_kl(hist, levels)
    return int(cands[len(kl) - 1 - np.argmin(kl[::-1])])


# ---------------------------------------------------------------- minmax, percentile


@pytest.mark.parametrize("kind", ["t3", "exp", "shifted"])
def test_minmax_is_exact(kind: str) -> None:
    x = samples(kind)
    s = summarize(x)
    ob = get_observer("minmax")
    assert ob.clip_range(s, 8, False) == (float(x.min()), float(x.max()))
    absmax = float(np.abs(x).max())
    assert ob.clip_range(s, 8, True) == (-absmax, absmax)


def assert_is_percentile(value: float, v: np.ndarray, pct: float) -> None:
    """``value`` is the ``pct``-th percentile of ``v`` up to one log bin's relative width.

    In a sparse tail the percentile is only pinned down between the two order statistics
    around it (np.percentile's "lower" and "higher"); in a dense region those coincide.
    """
    lower = np.percentile(v, pct, method="lower") * (1 - LOG_BIN)
    upper = np.percentile(v, pct, method="higher") * (1 + LOG_BIN)
    assert lower <= value <= upper


@pytest.mark.parametrize("pct", [50.0, 99.0, 99.9, 99.99])
@pytest.mark.parametrize("kind", ["t3", "outliers", "shifted"])
def test_percentile_matches_numpy(kind: str, pct: float) -> None:
    x = samples(kind, n=100_000)
    s = summarize(x)
    ob = get_observer("percentile", percentile=pct)
    lo, hi = ob.clip_range(s, 8, True)
    assert lo == -hi
    assert_is_percentile(hi, np.abs(x), pct)
    # asymmetric: each side at its own percentile, never past the observed extremes
    lo, hi = ob.clip_range(s, 8, False)
    assert_is_percentile(hi, x[x >= 0], pct)
    assert_is_percentile(-lo, -x[x < 0], pct)
    assert x.min() <= lo <= 0 <= hi <= x.max()


def test_percentile_dense_data_within_one_bin() -> None:
    x = samples("gauss", n=200_000)
    hi = get_observer("percentile", percentile=99.0).clip_range(summarize(x), 8, True)[1]
    assert abs(hi / np.percentile(np.abs(x), 99.0) - 1) <= LOG_BIN


def test_percentile_100_is_the_maximum() -> None:
    x = samples("t3")
    lo, hi = get_observer("percentile", percentile=100.0).clip_range(summarize(x), 8, False)
    assert lo == pytest.approx(float(x.min()), rel=1e-9)
    assert hi == pytest.approx(float(x.max()), rel=1e-9)


# ---------------------------------------------------------------- mse


def brute_force_mse(x: np.ndarray, base: tuple[float, float], bits: int, symmetric: bool) -> float:
    """The least raw-sample MSE over 400 clip fractions of the base range."""
    return min(
        raw_mse(x, f * base[0], f * base[1], bits, symmetric) for f in np.linspace(0.0025, 1, 400)
    )


@pytest.mark.parametrize(
    "kind,bits,symmetric",
    [
        ("gauss", 8, True), ("t3", 8, True), ("t3", 4, False), ("outliers", 8, True),
        ("outliers", 4, True), ("exp", 8, False), ("exp", 4, True), ("shifted", 8, False),
    ],
)
def test_mse_matches_brute_force_on_raw_samples(kind: str, bits: int, symmetric: bool) -> None:
    x = samples(kind, n=50_000)  # fewer samples: the sparse tail makes the raw MSE noisy
    lo, hi = get_observer("mse").clip_range(summarize(x), bits, symmetric)
    absmax = float(np.abs(x).max())
    base = (-absmax, absmax) if symmetric else (min(float(x.min()), 0.0), float(x.max()))
    assert raw_mse(x, lo, hi, bits, symmetric) <= 1.01 * brute_force_mse(x, base, bits, symmetric)
    assert base[0] <= lo <= hi <= base[1]


# ---------------------------------------------------------------- entropy


@pytest.mark.parametrize("kind,bits", [("gauss", 8), ("t3", 8), ("exp", 4), ("outliers", 6)])
def test_kl_curve_equals_reference_on_the_same_histogram(kind: str, bits: int) -> None:
    a = np.abs(samples(kind, n=100_000))
    hist = np.histogram(a, bins=HIST_BINS, range=(0, a.max()))[0]
    levels = 1 << (bits - 1)
    ref_cands, ref_kl = reference_kl(hist, levels)
    cands, kl = kl_divergences(torch.from_numpy(hist), levels)
    np.testing.assert_array_equal(cands.numpy(), ref_cands)
    finite = np.isfinite(ref_kl)
    np.testing.assert_array_equal(np.isfinite(kl.numpy()), finite)
    np.testing.assert_allclose(kl.numpy()[finite], ref_kl[finite], rtol=1e-9, atol=1e-12)
    assert entropy_threshold_bin(torch.from_numpy(hist), levels) == reference_threshold_bin(
        hist, levels
    )


@pytest.mark.parametrize(
    "dist", [scipy.stats.norm(), scipy.stats.t(5), scipy.stats.laplace(), scipy.stats.logistic()]
)
def test_entropy_end_to_end_matches_reference_on_raw_histogram(dist) -> None:
    """Through the log histogram, within two log bins of the reference on np.histogram.

    At 4 bits the optimum sits where the raw histogram is dense; at 8 bits it sits in the
    sparse tail, where the raw reference is dominated by empty bins (see the next test).
    """
    x = quasi_samples(dist, 200_000)
    a = np.abs(x)
    hist = np.histogram(a, bins=HIST_BINS, range=(0, a.max()))[0]
    ref = reference_threshold_bin(hist, 8) / HIST_BINS * float(a.max())
    lo, hi = EntropyObserver().clip_range(summarize(x), 4, True)
    assert lo == -hi
    assert abs(hi / ref - 1) <= 2 * LOG_BIN


@pytest.mark.parametrize("dist", [scipy.stats.norm(), scipy.stats.t(5), scipy.stats.laplace()])
def test_entropy_is_near_optimal_under_the_reference(dist) -> None:
    """At 6 bits, the reference KL (on the large-sample linear histogram) at our threshold
    is within 5% of its minimum: the KL curve is flat there, so thresholds themselves vary."""
    n = 200_000
    x = quasi_samples(dist, n)
    absmax = float(np.abs(x).max())
    edges = np.linspace(0, absmax, HIST_BINS + 1)
    expected = 2 * n * np.diff(dist.cdf(edges))  # |x| histogram as n -> infinity
    cands, ref_kl = reference_kl(expected, 32)
    _, hi = EntropyObserver().clip_range(summarize(x), 6, True)
    ours = ref_kl[int(round(hi / absmax * HIST_BINS)) - cands[0]]
    assert ours <= 1.05 * ref_kl.min()


def test_entropy_asymmetric_one_sided_uses_all_codes() -> None:
    x = quasi_samples(scipy.stats.expon(), 100_000)
    a = np.abs(x)
    hist = np.histogram(a, bins=HIST_BINS, range=(0, a.max()))[0]
    lo, hi = EntropyObserver().clip_range(summarize(x), 4, False)
    ref = reference_threshold_bin(hist, 15) / HIST_BINS * float(a.max())  # 2**4 - 1 levels
    assert lo == 0.0
    assert abs(hi / ref - 1) <= 2 * LOG_BIN


# ---------------------------------------------------------------- behaviour on real shapes


@pytest.mark.parametrize("name", ["percentile", "mse", "entropy"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_heavy_tails_clip_below_max_and_help_the_bulk(name: str, symmetric: bool) -> None:
    x = samples("outliers", n=50_000)
    s = summarize(x)
    bulk = x[np.abs(x) < 6]
    lo, hi = get_observer(name).clip_range(s, 8, symmetric)
    mlo, mhi = get_observer("minmax").clip_range(s, 8, symmetric)
    assert hi < mhi and lo > mlo
    assert raw_mse(bulk, lo, hi, 8, symmetric) < raw_mse(bulk, mlo, mhi, 8, symmetric)


@pytest.mark.parametrize("name", OBSERVER_NAMES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(
    "x",
    [np.zeros(100), np.full(100, 3.0), np.full(100, -0.5), np.full(10, 1e-9), np.full(10, 1e6),
     np.array([2.0, 2.5, 3.0]), np.array([-1e-30, 0.0, 1e-30])],
    ids=["zeros", "one-pos", "one-neg", "tiny", "huge", "all-pos", "denormal"],
)
def test_degenerate_inputs_stay_finite(name: str, symmetric: bool, x: np.ndarray) -> None:
    s = summarize(x, batches=1)
    lo, hi = get_observer(name).clip_range(s, 8, symmetric)
    assert np.isfinite([lo, hi]).all() and lo <= hi
    assert min(s.lo, 0.0, -s.absmax if symmetric else 0.0) <= lo
    assert hi <= max(s.hi, 0.0, s.absmax if symmetric else 0.0)
    scale, zero = get_observer(name).qparams(s, 8, symmetric)
    assert torch.isfinite(scale) and torch.isfinite(zero) and float(scale) > 0
    if not symmetric and s.lo >= 0:
        assert float(zero) == 0.0  # one-sided data: every code on the positive side


def test_all_zeros_give_a_zero_range() -> None:
    s = summarize(np.zeros(64), batches=1)
    for name in OBSERVER_NAMES:
        assert get_observer(name).clip_range(s, 8, True) == (0.0, 0.0)


def test_missing_histogram_falls_back_to_minmax() -> None:
    s = ActivationSummary(torch.zeros(HIST_BINS), torch.zeros(HIST_BINS), -2.0, 3.0)
    for name in OBSERVER_NAMES:
        assert get_observer(name).clip_range(s, 8, False) == (-2.0, 3.0)


@pytest.mark.parametrize("name", OBSERVER_NAMES)
def test_qparams_go_through_range_qparams(name: str) -> None:
    s = summarize(samples("t3", n=10_000))
    ob = get_observer(name)
    for bits, symmetric in [(8, True), (8, False), (4, False)]:
        lo, hi = ob.clip_range(s, bits, symmetric)
        expect = range_qparams(torch.tensor(lo), torch.tensor(hi), bits, symmetric)
        got = ob.qparams(s, bits, symmetric)
        assert all(torch.equal(g, e) and g.shape == () for g, e in zip(got, expect))


# ---------------------------------------------------------------- contract and errors


def test_registry() -> None:
    assert OBSERVER_NAMES == ("minmax", "percentile", "mse", "entropy")
    assert all(get_observer(n).name == n for n in OBSERVER_NAMES)
    assert get_observer("percentile", percentile=99.9) == PercentileObserver(99.9)
    assert get_observer("mse", grid=50) == MseObserver(grid=50)


def test_user_errors_are_quantcal_errors() -> None:
    with pytest.raises(QuantcalError, match="minmax, percentile, mse, entropy"):
        get_observer("kl")
    with pytest.raises(QuantcalError, match="takes percentile"):
        get_observer("percentile", pct=99.0)
    with pytest.raises(QuantcalError, match="percentile"):
        get_observer("percentile", percentile=0.0)
    with pytest.raises(QuantcalError, match="not a finite range"):
        ActivationSummary(torch.zeros(8), torch.zeros(8), float("inf"), float("-inf"))
    with pytest.raises(QuantcalError, match="differ in size"):
        ActivationSummary(torch.zeros(8), torch.zeros(9), 0.0, 1.0)
    s = summarize(samples("gauss", n=1000))
    with pytest.raises(QuantcalError, match="bits"):
        get_observer("minmax").clip_range(s, 1, True)
    with pytest.raises(QuantcalError, match="bins"):
        EntropyObserver(bins=64).clip_range(s, 8, True)
