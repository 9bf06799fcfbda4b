"""Quantization math: pure tensor-in, tensor-out functions, no state.

Conventions, shared by every stage:

- Codes are *unsigned*: ``q in [0, 2**bits - 1]`` and ``x ~ (q - zero_point) * scale``.
  Symmetric quantization is the special case ``zero_point = 2**(bits - 1)`` with
  ``scale = absmax / (2**(bits - 1) - 1)``, which is what MatMulNBits assumes when no zero
  points are given. Export converts to signed int8 (``q - 128``) where ONNX wants that.
- Zero points are integer-valued float tensors here; they become uint8 on export.
- Granularity is expressed by the shape of ``scale``/``zero_point``, which broadcast against
  the tensor: ``()`` per tensor, ``(N, 1)`` per output channel, ``(N, G, 1)`` per group on a
  grouped view ``(N, G, g)`` of an ``(N, K)`` weight (see :func:`group_view`).
- Asymmetric ranges always include zero, so zero is exactly representable.
- Rounding is round-half-to-even (``torch.round``), as in ONNX QuantizeLinear.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-10  # smallest scale; keeps all-zero groups finite


def code_range(bits: int) -> tuple[int, int]:
    """The unsigned code range ``(0, 2**bits - 1)``."""
    return 0, (1 << bits) - 1


def range_qparams(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map the real range ``[lo, hi]`` onto ``bits``-bit codes.

    Args:
        lo, hi: range ends, any (broadcastable) shape; ``lo <= hi``.
        bits: code width.
        symmetric: centre the codes on ``2**(bits-1)`` and use ``max(|lo|, |hi|)``.
    Returns:
        ``(scale, zero_point)``, float32, the broadcast shape of ``lo`` and ``hi``.
    """
    lo = torch.as_tensor(lo, dtype=torch.float32)
    hi = torch.as_tensor(hi, dtype=torch.float32)
    qmin, qmax = code_range(bits)
    if symmetric:
        absmax = torch.maximum(lo.abs(), hi.abs())
        scale = (absmax / ((qmax - 1) // 2)).clamp_min(EPS)
        zero = torch.full_like(scale, float(1 << (bits - 1)))
        return scale, zero
    lo = lo.clamp(max=0.0)
    hi = hi.clamp(min=0.0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(EPS)
    zero = torch.round(-lo / scale).clamp(qmin, qmax)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``clamp(round(x / scale) + zero)`` as uint8 (bits <= 8)."""
    qmin, qmax = code_range(bits)
    q = torch.round(x.float() / scale) + zero
    return q.clamp(qmin, qmax).to(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Real values ``(q - zero) * scale`` in float32."""
    return (q.float() - zero) * scale


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize then dequantize, returned in ``x``'s dtype."""
    return dequantize(quantize(x, scale, zero, bits), scale, zero).to(x.dtype)


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """View an ``(N, K)`` weight as ``(N, G, g)`` groups along K, zero-padding K up to ``G*g``."""
    n, k = w.shape
    groups = math.ceil(k / group_size)
    pad = groups * group_size - k
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(n, groups, group_size)  # (N, G, g)


def ungroup(wg: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`group_view`: ``(N, G, g)`` back to ``(N, K)``, padding dropped."""
    n = wg.shape[0]
    return wg.reshape(n, -1)[:, :k]


def weight_qparams(
    w: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    clip: torch.Tensor | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max qparams of an ``(N, K)`` weight per group (``group_size=None``: per channel).

    Args:
        clip: factor in (0, 1] shrinking each group's range (scalar, or ``(N, G)``).
    Returns:
        ``(scale, zero)``, each ``(N, G)`` float32 (``G = 1`` per channel).
    """
    wg = group_view(w.float(), group_size or w.shape[1])  # (N, G, g)
    clip = torch.as_tensor(clip, dtype=torch.float32)
    lo = wg.amin(dim=-1) * clip  # (N, G)
    hi = wg.amax(dim=-1) * clip
    return range_qparams(lo, hi, bits, symmetric)


def quantize_weight(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int | None
) -> torch.Tensor:
    """Codes of an ``(N, K)`` weight under ``(N, G)`` qparams, as ``(N, K)`` uint8."""
    k = w.shape[1]
    wg = group_view(w.float(), group_size or k)  # (N, G, g)
    q = quantize(wg, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)
    return ungroup(q, k)


def dequantize_weight(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int | None
) -> torch.Tensor:
    """Real ``(N, K)`` weight from codes and ``(N, G)`` qparams, float32."""
    k = q.shape[1]
    qg = group_view(q.float(), group_size or k)  # (N, G, g)
    return ungroup(dequantize(qg, scale.unsqueeze(-1), zero.unsqueeze(-1)), k)


def fake_quant_weight(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int | None
) -> torch.Tensor:
    """Quantize-dequantize an ``(N, K)`` weight with ``(N, G)`` qparams, in ``w``'s dtype."""
    q = quantize_weight(w, scale, zero, bits, group_size)
    return dequantize_weight(q, scale, zero, group_size).to(w.dtype)


def rtn_weight(
    w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool
) -> torch.Tensor:
    """Round-to-nearest reference: min/max qparams, then fake-quant. ``(N, K)`` in w's dtype."""
    scale, zero = weight_qparams(w, bits, group_size, symmetric)
    return fake_quant_weight(w, scale, zero, bits, group_size)
