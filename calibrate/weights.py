"""Weight quantizers that use the calibration statistics.

- ``rtn``: min/max qparams per group, round to nearest; the reference.
- ``aware_clip``: activation-aware clipping. For every group, search a clip ratio of its
  range that minimises the group's contribution to the layer's expected output error,
  ``sum_k E[x_k^2] * (w_k - q(w_k))^2`` (the diagonal of the layer's Hessian ``X^T X / T``
  weights each input channel by how much signal flows through it).
- ``gptq``: Hessian-aware rounding (Frantar et al., GPTQ): columns are rounded one at a time
  (in the natural order, or by descending Hessian diagonal with act-order) and each
  rounding error is spread over the columns not yet rounded through the inverse Hessian's
  Cholesky factor. Group ranges are set as the columns are quantized (from the
  error-updated weights, when a group's first column is reached), or, with act-order, on
  the original column groups before rounding (static groups); either way by the clip
  search above weighted by the Hessian diagonal, or min/max. :func:`gptq_factor` factors a
  Hessian once for every layer and format fed the same input; the block-by-block driver
  that builds the Hessians is :mod:`quantcal.calibrate.gptq`.

Pure functions on tensors: weights ``(N, K)``, statistics ``(K,)``, Hessians ``(K, K)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from quantcal import qmath

CLIP_STEPS = 26


def clip_grid(bits: int) -> torch.Tensor:
    """Candidate ratios of a group's range: down to 0.5 at 4 bits, finer near 1 at 8 bits
    (the best clip moves towards the full range as the grid of codes gets finer)."""
    lowest = 0.5 if bits <= 4 else 0.85
    return torch.linspace(1.0, lowest, CLIP_STEPS)


ROW_CHUNK = 4096  # rows per step of the search; bounds its memory to a few chunk x K floats
SEARCH_ELEMENTS = ROW_CHUNK * ROW_CHUNK  # rows x ratios x g per step of clip_group's search


def rtn(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest qparams ``(scale, zero)``, each ``(N, G)``."""
    return qmath.weight_qparams(w, bits, group_size, symmetric)


def aware_clip(w: torch.Tensor, h_diag: torch.Tensor, bits: int, group_size: int | None,
               symmetric: bool, grid: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Qparams ``(scale, zero)`` ``(N, G)`` with a per-group clip chosen by weighted error.

    Args:
        w: ``(N, K)`` weight.
        h_diag: ``(K,)`` mean squared activation per input channel, E[x_k^2].
        grid: candidate clip ratios (default :func:`clip_grid` of ``bits``).
    """
    grid = clip_grid(bits) if grid is None else grid
    n, k = w.shape
    g = group_size or k
    w = w.float()
    h = qmath.group_view(h_diag.float().to(w.device).unsqueeze(0), g)[0]  # (G, g)
    scales, zeros = [], []
    for rows in w.split(ROW_CHUNK):
        wg = qmath.group_view(rows, g)  # (n, G, g)
        lo, hi = wg.amin(-1), wg.amax(-1)  # (n, G)
        best_err = torch.full_like(lo, float("inf"))
        # the unclipped range (r = 1) stands when no candidate's error is finite (an inf or
        # NaN statistic), so the result is always plain min/max, never uninitialised memory
        best_s, best_z = qmath.range_qparams(lo, hi, bits, symmetric)  # (n, G) each
        for r in grid.tolist():
            s, z = qmath.range_qparams(lo * r, hi * r, bits, symmetric)  # (n, G)
            wq = qmath.fake_quant(wg, s.unsqueeze(-1), z.unsqueeze(-1), bits)
            err = ((wq - wg).square_() * h).sum(-1)  # (n, G)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z, best_z)
        scales.append(best_s)
        zeros.append(best_z)
    return torch.cat(scales), torch.cat(zeros)


class GptqFactor(NamedTuple):
    """What GPTQ needs of one Hessian; shared by every layer and format fed the same input."""

    hinv: torch.Tensor  # (K, K) upper Cholesky factor of the damped H^-1, in ``order``
    order: torch.Tensor | None  # (K,) columns in quantization order (act-order); None: 0..K-1
    dead: torch.Tensor  # (K,) bool: columns no calibration token reached (diag(H) == 0)
    diag: torch.Tensor  # (K,) diag(H) in the natural order: the clip search's weights


def gptq_factor(h: torch.Tensor, damp: float = 0.01, act_order: bool = False) -> GptqFactor:
    """Factor ``h`` (K, K) = X^T X / T for :func:`gptq`, as GPTQ does: dead columns get a
    unit diagonal, act-order sorts the columns by descending diagonal (stable), ``damp`` times
    the mean diagonal is added, and the upper Cholesky factor of the inverse is taken.

    Computes in float32 (float64 when ``h`` is float64). Raises ``torch.linalg.LinAlgError``
    when the damped Hessian is not positive definite.
    """
    dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    h = h.to(dtype).clone()
    diag = torch.diag(h).clone()  # (K,)
    dead = diag == 0
    h[dead, dead] = 1.0
    order = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else None
    if order is not None:
        h = h[order][:, order]
    h.diagonal().add_(damp * torch.diag(h).mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    return GptqFactor(hinv, order, dead, diag)


def gptq(w: torch.Tensor, factor: GptqFactor, bits: int, group_size: int | None,
         symmetric: bool, *, clip: bool = True, block: int = 128
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al.): ``(scale, zero)`` ``(N, G)`` and codes ``(N, K)`` uint8 of ``w``.

    Columns are rounded one at a time in the factor's order, each rounding error spread over
    the columns not yet rounded through ``factor.hinv`` (updates batched per ``block``
    columns, as GPTQ's lazy batches).

    Group ranges: in the natural order, a group's ``(scale, zero)`` is set when its first
    column is reached, from the group's error-updated weights (GPTQ without static groups);
    with act-order (``factor.order``) every group's range is set before rounding from the
    weights as given, on the original column groups (GPTQ's static groups), so the codes keep
    MatMulNBits' layout whatever the order. ``clip``: each range is the activation-aware clip
    search (:func:`aware_clip`; :func:`clip_group` for one group) weighted by
    ``factor.diag``; otherwise min/max.

    Args:
        w: ``(N, K)`` weight; computed in the factor's dtype.
        block: columns per lazy batch; in the natural order rounded down to a multiple of
            the group size (at least one group), so that a group's range is set from fully
            updated columns.
    """
    k = w.shape[1]
    g = group_size or k
    w = w.to(factor.hinv.dtype).clone()  # (N, K)
    w[:, factor.dead] = 0.0
    if factor.order is None:
        scale, zero = _empty_qparams(w, -(-k // g))
        codes = _sweep(w, factor.hinv, bits, g * max(1, block // g),
                       _dynamic_groups(scale, zero, g, factor.diag, bits, symmetric, clip))
        return scale, zero, codes
    if clip:  # (N, G) on the original groups
        scale, zero = aware_clip(w, factor.diag, bits, g, symmetric)
    else:
        scale, zero = qmath.weight_qparams(w, bits, g, symmetric)
    group_of = (factor.order // g).tolist()  # group of the column rounded i-th

    def fixed(col: int, _rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return scale[:, group_of[col]], zero[:, group_of[col]]

    codes = _sweep(w[:, factor.order], factor.hinv, bits, block, fixed)
    return scale, zero, codes[:, torch.argsort(factor.order)]


def clip_group(w: torch.Tensor, h: torch.Tensor, bits: int, symmetric: bool,
               grid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`aware_clip` of one group ``w`` (N, g) weighted by ``h`` (g,): ``(scale, zero)``
    (N, 1), every clip ratio of the grid tried at once (one launch per step instead of one
    per ratio: GPTQ searches each group on its own). The first least error wins; when no
    error is finite, the unclipped range."""
    grid = (clip_grid(bits) if grid is None else grid).to(w.device)  # (R,)
    w, h = w.float(), h.float().to(w.device)
    scales, zeros = [], []
    for rows in w.split(max(1, SEARCH_ELEMENTS // (grid.shape[0] * w.shape[1]))):
        lo, hi = rows.amin(-1), rows.amax(-1)  # (n,)
        s, z = qmath.range_qparams(lo * grid[:, None], hi * grid[:, None], bits,
                                   symmetric)  # (R, n)
        wq = qmath.fake_quant(rows, s.unsqueeze(-1), z.unsqueeze(-1), bits)  # (R, n, g)
        err = ((wq - rows).square_() * h).sum(-1).nan_to_num_(nan=float("inf"))  # (R, n)
        best = err.argmin(0, keepdim=True)  # (1, n)
        scales.append(s.gather(0, best)[0])
        zeros.append(z.gather(0, best)[0])
    return torch.cat(scales).unsqueeze(1), torch.cat(zeros).unsqueeze(1)


def _empty_qparams(w: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = w.shape[0]
    return (torch.zeros(n, groups, device=w.device), torch.zeros(n, groups, device=w.device))


def _dynamic_groups(scale: torch.Tensor, zero: torch.Tensor, g: int, diag: torch.Tensor,
                    bits: int, symmetric: bool, clip: bool):
    """Column qparams that set group ``col // g``'s range at its first column, from the
    block's error-updated columns ``rest`` (N, >= g, from ``col`` on)."""
    grid = clip_grid(bits).to(diag.device)  # once: a copy per group would wait for the GPU

    def at(col: int, rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        group = col // g
        if col % g == 0:
            wg = rest[:, :g]  # (N, <= g)
            s, z = (clip_group(wg, diag[col:col + wg.shape[1]], bits, symmetric, grid) if clip
                    else qmath.weight_qparams(wg, bits, None, symmetric))  # (N, 1) each
            scale[:, group], zero[:, group] = s[:, 0], z[:, 0]
        return scale[:, group], zero[:, group]
    return at


def _sweep(w: torch.Tensor, hinv: torch.Tensor, bits: int, block: int, qparams_at
           ) -> torch.Tensor:
    """GPTQ's column loop over ``w`` (N, K), updated in place; codes (N, K) in w's order.

    ``qparams_at(col, rest)`` gives column ``col``'s ``(scale, zero)`` (N,) each; ``rest`` is
    the current lazy batch from ``col`` on, error updates included."""
    n, k = w.shape
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()  # (N, b)
        err = torch.empty_like(w1)
        for j in range(i2 - i1):
            col = i1 + j
            s, z = qparams_at(col, w1[:, j:])
            q = qmath.quantize(w1[:, j], s, z, bits)  # (N,)
            codes[:, col] = q
            e = (w1[:, j] - qmath.dequantize(q, s, z)) / hinv[col, col]
            w1[:, j:] -= e.unsqueeze(1) * hinv[col, col:i2].unsqueeze(0)
            err[:, j] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return codes


def output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    """Mean squared error of the layer output, ``||x W^T - x W_hat^T||^2 / numel``."""
    x = x.reshape(-1, x.shape[-1]).float()
    return float((x @ (w.float() - w_hat.float()).T).square().mean())
