"""Weight quantizers that use the calibration statistics.

- ``rtn``: min/max qparams per group, round to nearest; the reference.
- ``aware_clip``: activation-aware clipping. For every group, search a clip ratio of its
  range that minimises the group's contribution to the layer's expected output error,
  ``sum_k E[x_k^2] * (w_k - q(w_k))^2`` (the diagonal of the layer's Hessian ``X^T X / T``
  weights each input channel by how much signal flows through it).
- ``gptq``: Hessian-aware rounding (Frantar et al., GPTQ) with the clipped qparams fixed per
  group: columns are rounded in order and each rounding error is spread over the columns not
  yet rounded through the inverse Hessian's Cholesky factor.

Pure functions on tensors: weights ``(N, K)``, statistics ``(K,)`` or ``(K, K)``.
"""

from __future__ import annotations

import torch

from quantcal import qmath

CLIP_STEPS = 26


def clip_grid(bits: int) -> torch.Tensor:
    """Candidate ratios of a group's range: down to 0.5 at 4 bits, finer near 1 at 8 bits
    (the best clip moves towards the full range as the grid of codes gets finer)."""
    lowest = 0.5 if bits <= 4 else 0.85
    return torch.linspace(1.0, lowest, CLIP_STEPS)
ROW_CHUNK = 4096  # rows per step of the search; bounds its memory to a few chunk x K floats


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


def gptq(w: torch.Tensor, xtx: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
         bits: int, group_size: int | None, damp: float = 0.01, block: int = 128
         ) -> torch.Tensor:
    """Codes ``(N, K)`` uint8 rounded with GPTQ under the given ``(N, G)`` qparams.

    Args:
        xtx: ``(K, K)`` sum of ``x x^T`` over calibration tokens.
        damp: fraction of the mean diagonal added for numerical stability.
    """
    n, k = w.shape
    g = group_size or k
    w = w.float().clone()
    h = xtx.float().to(w.device).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * torch.diag(h).mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
    col_scale = scale.repeat_interleave(g, dim=1)[:, :k]  # (N, K)
    col_zero = zero.repeat_interleave(g, dim=1)[:, :k]
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        for j in range(i2 - i1):
            col = i1 + j
            s, z = col_scale[:, col], col_zero[:, col]
            q = qmath.quantize(w1[:, j], s, z, bits)
            codes[:, col] = q
            d = hinv[col, col]
            e = (w1[:, j] - qmath.dequantize(q, s, z)) / d
            w1[:, j:] -= e.unsqueeze(1) * hinv[col, col:i2].unsqueeze(0)
            err1[:, j] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes


def output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    """Mean squared error of the layer output, ``||x W^T - x W_hat^T||^2 / numel``."""
    x = x.reshape(-1, x.shape[-1]).float()
    return float((x @ (w.float() - w_hat.float()).T).square().mean())
