"""Quantization math: round-trip error bounds (property-based), exactness of codes,
granularities, and RTN as the reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantcal import qmath

bits_st = st.sampled_from([2, 4, 8])


@st.composite
def tensors(draw, max_rows=6, max_cols=70):
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(1, max_cols))
    seed = draw(st.integers(0, 2**20))
    scale = draw(st.sampled_from([1e-4, 1e-2, 1.0, 50.0]))
    shift = draw(st.sampled_from([0.0, 0.5, -3.0]))
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) + shift) * scale


@given(x=tensors(), bits=bits_st, symmetric=st.booleans())
@settings(max_examples=150, deadline=None)
def test_per_tensor_round_trip_within_half_step(x, bits, symmetric):
    scale, zero = qmath.range_qparams(x.min(), x.max(), bits, symmetric)
    y = qmath.fake_quant(x, scale, zero, bits)
    # inside the range, rounding error is at most half a step (+ fp32 slack)
    assert torch.all((y - x).abs() <= scale / 2 * (1 + 1e-5) + 1e-6 * x.abs())


@given(x=tensors(), bits=bits_st, symmetric=st.booleans(),
       group=st.sampled_from([None, 4, 16, 32]))
@settings(max_examples=150, deadline=None)
def test_weight_round_trip_per_group(x, bits, symmetric, group):
    scale, zero = qmath.weight_qparams(x, bits, group, symmetric)
    groups = 1 if group is None else -(-x.shape[1] // group)
    assert scale.shape == zero.shape == (x.shape[0], groups)
    q = qmath.quantize_weight(x, scale, zero, bits, group)
    assert q.dtype == torch.uint8 and q.shape == x.shape and int(q.max()) < (1 << bits)
    y = qmath.dequantize_weight(q, scale, zero, group)
    step = scale.repeat_interleave(group or x.shape[1], dim=1)[:, : x.shape[1]]  # (N, K)
    assert torch.all((y - x).abs() <= step / 2 * (1 + 1e-5) + 1e-6 * x.abs())


@given(bits=bits_st, symmetric=st.booleans(), x=tensors())
@settings(max_examples=60, deadline=None)
def test_zero_is_exact_and_codes_in_range(bits, symmetric, x):
    scale, zero = qmath.range_qparams(x.min(), x.max(), bits, symmetric)
    assert float(zero) == round(float(zero)) and 0 <= float(zero) < (1 << bits)
    z = qmath.fake_quant(torch.zeros(3), scale, zero, bits)
    assert torch.all(z == 0)


def test_symmetric_uses_restricted_range():
    x = torch.tensor([-1.0, 0.25, 0.7])
    scale, zero = qmath.range_qparams(x.min(), x.max(), 4, True)
    assert float(scale) == pytest.approx(1.0 / 7) and float(zero) == 8
    q = qmath.quantize(x, scale, zero, 4)
    assert q.tolist() == [1, 10, 13]


def test_all_zero_group_stays_finite():
    w = torch.zeros(2, 64)
    w[1, :32] = 1.0
    y = qmath.rtn_weight(w, 4, 32, symmetric=False)
    assert torch.isfinite(y).all() and torch.equal(y, w)


def test_clip_shrinks_range():
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    s1, _ = qmath.weight_qparams(w, 4, 32, False)
    s2, _ = qmath.weight_qparams(w, 4, 32, False, clip=0.8)
    assert torch.allclose(s2, s1 * 0.8, rtol=1e-5)


def test_grouping_round_trip_with_padding():
    w = torch.arange(2 * 70, dtype=torch.float32).reshape(2, 70)
    g = qmath.group_view(w, 32)
    assert g.shape == (2, 3, 32) and torch.all(g[:, 2, 6:] == 0)
    assert torch.equal(qmath.ungroup(g, 70), w)


def test_int8_error_much_smaller_than_int4():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    e8 = (qmath.rtn_weight(w, 8, 128, False) - w).pow(2).mean()
    e4 = (qmath.rtn_weight(w, 4, 128, False) - w).pow(2).mean()
    assert e8 * 100 < e4
