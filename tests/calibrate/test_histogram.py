"""Tests of quantcal.calibrate.histogram: binning against a numpy reference, accumulation
invariances, the no-sync construction, and the read-out math (CDF, percentile, resampling)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantcal.calibrate import histogram
from quantcal.calibrate.histogram import (
    HIST_BINS,
    LOG2_HI,
    LOG2_LO,
    abs_cdf,
    abs_percentile,
    accumulate_hist_,
    bin_centres,
    hist_edges,
    interp,
    new_hist,
    occupied_bins,
    resample_linear,
    side_cdf,
)

BIN_RATIO = 2.0 ** ((LOG2_HI - LOG2_LO) / HIST_BINS)  # edge[i+1] / edge[i]


def reference_hists(x: np.ndarray, bins: int = HIST_BINS) -> tuple[np.ndarray, np.ndarray]:
    """np.histogram on log2|x| with the same edges; out-of-range values into the end bins."""
    x = np.asarray(x, dtype=np.float64)
    edges = np.linspace(LOG2_LO, LOG2_HI, bins + 1)
    mid = (edges[0] + edges[1]) / 2, (edges[-2] + edges[-1]) / 2

    def one(mag: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):
            lg = np.log2(mag)
        lg = np.clip(np.nan_to_num(lg, neginf=mid[0]), *mid)  # zeros and below -> bin 0
        return np.histogram(lg, bins=edges)[0]

    return one(x[x >= 0]), one(-x[x < 0])


def hists_of(*batches: torch.Tensor, dtype: torch.dtype = torch.int64):
    device = batches[0].device if batches else "cpu"  # histograms live beside the values
    hp, hn = new_hist(device, dtype=dtype), new_hist(device, dtype=dtype)
    for b in batches:
        accumulate_hist_(hp, hn, b)
    return hp, hn


def log_uniform_samples(n: int, seed: int) -> np.ndarray:
    """Signed values spanning beyond both ends of the range, plus exact zeros."""
    rng = np.random.default_rng(seed)
    mags = 2.0 ** rng.uniform(LOG2_LO - 4, LOG2_HI + 4, n)
    x = mags * rng.choice([-1.0, 1.0], n)
    x[: n // 50] = 0.0
    return x.astype(np.float32)


def test_edges_and_centres() -> None:
    edges = hist_edges()
    assert edges.shape == (HIST_BINS + 1,)
    assert float(edges[0]) == 2.0**LOG2_LO and float(edges[-1]) == 2.0**LOG2_HI
    ratios = edges[1:] / edges[:-1]
    assert torch.allclose(ratios, torch.full_like(ratios, BIN_RATIO), rtol=1e-12)
    centres = bin_centres()
    assert centres.shape == (HIST_BINS,)
    assert bool(((centres > edges[:-1]) & (centres < edges[1:])).all())
    assert hist_edges(16).shape == (17,)


def test_matches_numpy_reference() -> None:
    x = log_uniform_samples(200_000, seed=0)
    hp, hn = hists_of(torch.from_numpy(x))
    rp, rn = reference_hists(x)
    # fp32 log2 vs float64 may put values within ~1e-6 (relative) of an edge one bin over
    assert np.abs(hp.numpy() - rp).sum() <= 1e-3 * len(x)
    assert np.abs(hn.numpy() - rn).sum() <= 1e-3 * len(x)
    assert int(hp.sum() + hn.sum()) == len(x)
    assert int(hp[0]) >= len(x) // 50  # the zeros


def test_exact_on_bin_centres() -> None:
    centres = bin_centres(dtype=torch.float32)
    hp, hn = hists_of(centres, -centres)
    assert torch.equal(hp, torch.ones_like(hp))
    assert torch.equal(hn, torch.ones_like(hn))


def test_out_of_range_zero_nan_inf() -> None:
    x = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, float("inf"), float("-inf"),
                      float("nan")])
    hp, hn = hists_of(x)
    # -0.0 >= 0 is True: both zeros count as non-negative; NaN is counted nowhere
    assert int(hp[0]) == 3 and int(hp[-1]) == 2
    assert int(hn[0]) == 1 and int(hn[-1]) == 2
    assert int(hp.sum() + hn.sum()) == 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs(dtype: torch.dtype) -> None:
    x = torch.from_numpy(log_uniform_samples(20_000, seed=1)).clamp(-6e4, 6e4).to(dtype)
    assert torch.equal(torch.stack(hists_of(x)), torch.stack(hists_of(x.float())))


def test_any_shape_and_float_counts() -> None:
    x = torch.randn(3, 5, 7, 11, generator=torch.Generator().manual_seed(0))
    flat = torch.stack(hists_of(x.reshape(-1)))
    assert torch.equal(torch.stack(hists_of(x)), flat)
    assert torch.equal(torch.stack(hists_of(x, dtype=torch.float64)).long(), flat)
    assert torch.equal(torch.stack(hists_of(x.transpose(0, 3))), flat)  # non-contiguous


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    cuts=st.lists(st.integers(0, 3000), max_size=6),
)
def test_batches_in_any_order_equal_one_shot(seed: int, cuts: list[int]) -> None:
    x = torch.from_numpy(log_uniform_samples(3000, seed % 1000))
    batches = list(torch.tensor_split(x, sorted(cuts)))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(batches))
    split = torch.stack(hists_of(*[batches[i] for i in order]))
    assert torch.equal(split, torch.stack(hists_of(x)))


def test_no_data_dependent_ops_by_construction() -> None:
    """Meta tensors hold no data: any .item(), bincount or data-dependent shape would fail."""
    hp, hn = new_hist("meta"), new_hist("meta")
    accumulate_hist_(hp, hn, torch.empty(4, 16, 64, device="meta", dtype=torch.bfloat16))
    assert hp.shape == (HIST_BINS,) and hp.device.type == "meta"


@pytest.mark.gpu
def test_cuda_accumulates_without_sync() -> None:
    x = torch.from_numpy(log_uniform_samples(100_000, seed=2)).cuda().half()
    x[::997] = float("nan")
    hp, hn = new_hist("cuda"), new_hist("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for part in x.chunk(4):
            accumulate_hist_(hp, hn, part.reshape(5, -1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = torch.stack(hists_of(x.cpu()))
    assert torch.equal(torch.stack([hp, hn]).cpu(), cpu)
    torch.use_deterministic_algorithms(True)  # CUDA histc refuses it: the fallback counts
    try:
        assert torch.equal(torch.stack(hists_of(x)).cpu(), cpu)
    finally:
        torch.use_deterministic_algorithms(False)


def test_index_add_fallback_counts_like_histc() -> None:
    code = torch.tensor([0.5, 0.5, 3.5, float("nan"), 7.5, 2.5])
    expect = torch.histc(code, bins=8, min=0.0, max=8.0)
    assert torch.equal(histogram._count_codes_index_add(code, 8), expect)


def test_interp_matches_numpy() -> None:
    rng = np.random.default_rng(3)
    xp = np.sort(rng.uniform(0, 10, 50))
    fp = np.cumsum(rng.uniform(0, 1, 50))
    x = rng.uniform(-1, 11, 200)
    ours = interp(torch.from_numpy(x), torch.from_numpy(xp), torch.from_numpy(fp))
    np.testing.assert_allclose(ours.numpy(), np.interp(x, xp, fp), rtol=1e-12)


def test_side_cdf_is_truncated_at_the_maximum() -> None:
    x = torch.tensor([0.0, 0.3, 0.5, 1.7, 3e5])  # beyond 2**LOG2_HI: the last bin stretches
    hp, _ = hists_of(x)
    knots, cdf = side_cdf(hp, 3e5)
    assert float(knots[0]) == 0.0 and float(knots[-1]) == 3e5
    assert bool((knots.diff() >= 0).all()) and float(cdf[-1]) == 5
    lower, upper, counts = occupied_bins(hp, 1.7)  # a smaller cap clamps every interval
    assert float(upper.max()) <= 1.7 and float(counts.sum()) == 5


@pytest.mark.parametrize("pct", [50.0, 99.0, 99.9, 99.99, 100.0])
def test_percentile_matches_numpy(pct: float) -> None:
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.standard_t(3, 100_000), rng.normal(0, 40, 20)]).astype(np.float32)
    hp, hn = hists_of(torch.from_numpy(x))
    ours = abs_percentile(hp, hn, pct, max(float(x.max()), 0.0), max(float(-x.min()), 0.0))
    ref = np.percentile(np.abs(x), pct)
    assert abs(ours / ref - 1) <= BIN_RATIO - 1
    assert ours <= np.abs(x).max()


def test_resample_linear_against_raw_histogram() -> None:
    rng = np.random.default_rng(5)
    x = rng.laplace(size=200_000).astype(np.float32)
    hp, hn = hists_of(torch.from_numpy(x))
    absmax = float(np.abs(x).max())
    knots, cdf = abs_cdf(hp, hn, float(x.max()), float(-x.min()))
    lin = resample_linear(knots, cdf, absmax, 64)
    ref = np.histogram(np.abs(x), bins=64, range=(0, absmax))[0]
    assert lin.shape == (64,) and float(lin.sum()) == pytest.approx(len(x), rel=1e-12)
    assert np.abs(lin.numpy() - ref).sum() <= 0.01 * len(x)


def test_resample_folds_mass_above_top_and_keeps_zeros() -> None:
    hp, hn = hists_of(torch.tensor([0.0, 0.0, 1.0, 2.0, -3.0, -8.0]))
    knots, cdf = abs_cdf(hp, hn, 2.0, 8.0)
    lin = resample_linear(knots, cdf, 4.0, 8)
    assert float(lin.sum()) == 6 and float(lin[0]) >= 2 and float(lin[-1]) >= 1


def test_chunked_counting_equals_one_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.from_numpy(log_uniform_samples(5000, seed=6))
    whole = torch.stack(hists_of(x))
    monkeypatch.setattr(histogram, "_CHUNK", 7)
    assert torch.equal(torch.stack(hists_of(x)), whole)


def test_counts_stay_exact_past_float32_integers() -> None:
    """2**24 + 3 zeros in one call: a float32 count would stop at 2**24."""
    hp, hn = hists_of(torch.zeros(2**24 + 3, dtype=torch.bfloat16))
    assert int(hp[0]) == 2**24 + 3 and int(hp.sum()) == 2**24 + 3 and int(hn.sum()) == 0
