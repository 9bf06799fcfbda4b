"""GPTQ's math (calibrate.weights.gptq) against a plain, slow reference written here from the
paper: one column at a time, no lazy batches, no Cholesky factor (the inverse Hessian is
updated by Gaussian elimination, the paper's eq. 4), group ranges set when a group's first
column is reached, or (act-order) fixed beforehand on the original column groups.

The reference shares no code with quantcal: its quantizer is written from the conventions
in quantcal.qmath's docstring (unsigned codes, ``(q - zero) * scale``, symmetric zero
``2**(bits-1)`` with ``scale = absmax / (2**(bits-1) - 1)``, round half to even, float32)."""

from __future__ import annotations

import pytest
import torch

from quantcal.calibrate import weights


def _ref_range(wg: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, ...]:
    """Min/max (scale, zero) per row of ``wg`` (N, g), float32."""
    w32 = wg.float()
    lo = w32.min(1).values.clamp(max=0.0)
    hi = w32.max(1).values.clamp(min=0.0)
    qmax = 2 ** bits - 1
    if symmetric:
        scale = (torch.maximum(lo.abs(), hi) / (2 ** (bits - 1) - 1)).clamp_min(1e-10)
        return scale, torch.full_like(scale, float(2 ** (bits - 1)))
    scale = ((hi - lo) / qmax).clamp_min(1e-10)
    return scale, torch.round(-lo / scale).clamp(0, qmax)


def _ref_quant(col: torch.Tensor, scale, zero, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = (torch.round(col.float() / scale) + zero).clamp(0, 2 ** bits - 1)
    return q.to(torch.uint8), (q - zero) * scale


def reference_gptq(w: torch.Tensor, h: torch.Tensor, bits: int, g: int, symmetric: bool,
                   act_order: bool, damp: float = 0.01) -> torch.Tensor:
    """Codes (N, K) by the paper's algorithm in float64, column by column."""
    w, h = w.double().clone(), h.double().clone()
    k = w.shape[1]
    dead = h.diag() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    static = [_ref_range(w[:, i:i + g], bits, symmetric) for i in range(0, k, g)]
    perm = (torch.argsort(h.diag(), descending=True, stable=True) if act_order
            else torch.arange(k))
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * h.diag().mean() * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    codes = torch.zeros(w.shape, dtype=torch.uint8)
    for i in range(k):
        if act_order:
            scale, zero = static[int(perm[i]) // g]
        elif i % g == 0:
            scale, zero = _ref_range(w[:, i:i + g], bits, symmetric)
        q, deq = _ref_quant(w[:, i], scale, zero, bits)
        codes[:, perm[i]] = q
        err = (w[:, i] - deq) / hinv[i, i]
        w[:, i:] -= err[:, None] * hinv[i, i:][None, :]  # the OBS update (eq. 3)
        hinv = hinv - hinv[:, i:i + 1] @ hinv[i:i + 1, :] / hinv[i, i]  # drop column i (eq. 4)
    return codes


def _layer(n: int, k: int, seed: int, dead: int | None = 5) -> tuple[torch.Tensor, ...]:
    """A weight with an outlier row and a Hessian of correlated inputs with spread channel
    scales (distinct diagonal: a definite act-order) and one dead channel."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    w[3] *= 6.0
    mix = torch.randn(k, k, generator=gen) / k ** 0.5 + torch.eye(k)
    x = (torch.randn(4 * k, k, generator=gen) @ mix) * torch.logspace(-1, 0.5, k)[
        torch.randperm(k, generator=gen)]
    if dead is not None:
        x[:, dead] = 0.0
    return w, x.T @ x / x.shape[0]


CASES = [(4, 32, False, 256), (4, 128, False, 256), (4, 64, True, 200), (8, 32, False, 200),
         (4, 64, False, 72)]


@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act-order"])
@pytest.mark.parametrize("bits, g, symmetric, k", CASES)
def test_codes_equal_the_papers_algorithm(bits, g, symmetric, k, act_order):
    """Lazy batches of 128 columns, the Cholesky factor, groups straddling no batch and
    a partial last group give the reference's codes exactly (float64, so only the order of
    the sums differs)."""
    w, h = _layer(24, k, seed=k + g + bits)
    factor = weights.gptq_factor(h.double(), act_order=act_order)
    scale, zero, codes = weights.gptq(w.double(), factor, bits, g, symmetric, clip=False)
    ref = reference_gptq(w, h, bits, g, symmetric, act_order)
    assert codes.dtype == torch.uint8 and codes.shape == w.shape
    assert scale.shape == zero.shape == (24, -(-k // g))
    assert torch.equal(codes, ref), f"{int((codes != ref).sum())} of {codes.numel()} differ"


def test_float32_stays_close_to_the_reference():
    """The stage computes in float32: a flipped rounding here and there, no more."""
    w, h = _layer(32, 256, seed=3)
    for act_order in (False, True):
        factor = weights.gptq_factor(h, act_order=act_order)
        _, _, codes = weights.gptq(w, factor, 4, 32, False, clip=False)
        agree = (codes == reference_gptq(w, h, 4, 32, False, act_order)).float().mean()
        assert agree > 0.99, (act_order, float(agree))


def test_groups_are_set_from_the_error_updated_weights():
    """Without act-order a later group's range is not the range of the weights as given
    (what GPTQ with frozen qparams would use): the rounding errors of the columns before it
    moved them. With act-order the ranges are the given weights' (static groups)."""
    w, h = _layer(24, 128, seed=7, dead=None)
    frozen_s, _ = _ref_range(w[:, 64:96], 4, False)
    natural = weights.gptq(w, weights.gptq_factor(h), 4, 32, False, clip=False)
    static = weights.gptq(w, weights.gptq_factor(h, act_order=True), 4, 32, False, clip=False)
    torch.testing.assert_close(natural[0][:, 0], _ref_range(w[:, :32], 4, False)[0])
    assert not torch.allclose(natural[0][:, 2], frozen_s)
    torch.testing.assert_close(static[0][:, 2], frozen_s)


def _hessian_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    d = (w - w_hat).double()
    return float(torch.einsum("nk,kl,nl->", d, h.double(), d))


@pytest.mark.parametrize("act_order", [False, True])
def test_clip_searched_groups_beat_min_max_groups(act_order):
    """The clip search inside GPTQ (ranges weighted by diag(H)) lowers the output error
    GPTQ minimises, against GPTQ with min/max ranges, over a few layers."""
    clipped = plain = 0.0
    for seed in range(4):
        w, h = _layer(48, 256, seed=seed)
        factor = weights.gptq_factor(h, act_order=act_order)
        for clip in (True, False):
            s, z, q = weights.gptq(w, factor, 4, 64, False, clip=clip)
            err = _hessian_error(w, (q.float() - z.repeat_interleave(64, 1)) *
                                 s.repeat_interleave(64, 1), h)
            clipped, plain = (clipped + err, plain) if clip else (clipped, plain + err)
    assert clipped < plain


@pytest.mark.parametrize("bits, symmetric", [(4, False), (4, True), (8, False)])
def test_one_group_clip_search_equals_the_layer_search(bits, symmetric, monkeypatch):
    """GPTQ's per-group search (all ratios at once, rows in steps) picks what aware_clip's
    loop over the ratios picks for that group, NaN weights included (then: the unclipped
    range)."""
    monkeypatch.setattr(weights, "SEARCH_ELEMENTS", 26 * 128 * 70)  # steps of 70+ rows
    gen = torch.Generator().manual_seed(bits)
    for g in (8, 32, 128):
        w = torch.randn(300, g, generator=gen) * torch.rand(300, 1, generator=gen)
        w[7, 3] *= 20.0
        h = torch.rand(g, generator=gen) ** 4
        for weight in (h, torch.full((g,), float("nan"))):
            ref = weights.aware_clip(w, weight, bits, None, symmetric)
            got = weights.clip_group(w, weight, bits, symmetric)
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
