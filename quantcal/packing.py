"""Packing of quantized weights into the layouts of onnxruntime's ``MatMulNBits`` and
``GatherBlockQuantized`` (com.microsoft).

``MatMulNBits`` computes ``Y = A @ dequant(B)^T`` for an ``(N, K)`` weight quantized in blocks
of ``block_size`` along K. Its inputs, for ``G = ceil(K / block_size)`` blocks per row:

- ``B``: uint8 ``(N, G, block_size * bits / 8)``; codes packed low bits first along K
  (4 bits: element ``2i`` in the low nibble of byte ``i``, ``2i + 1`` in the high nibble);
  K is zero-padded to ``G * block_size``.
- ``scales``: ``(N, G)`` in the activation dtype (fp32 or fp16); onnxruntime also accepts the
  flat ``(N * G,)`` of older exporters.
- ``zero_points`` (optional): uint8 ``(N, ceil(G * bits / 8))``, codes packed the same way
  along G; absent means ``2**(bits - 1)`` (symmetric).

``GatherBlockQuantized`` (uint8 data, ``gather_axis=0``, ``quantize_axis=1``) returns rows of a
``(V, K)`` table quantized in blocks along K. Its data is MatMulNBits' ``B`` with each row's
blocks laid end to end, ``(V, G * blob)``; scales ``(V, G)`` and zero points
``(V, ceil(G * bits / 8))`` are MatMulNBits'. So a head tied to the embedding can share all
three (``B`` through a Reshape). The node returns ``G * block_size`` columns; the graph slices
them to K.

All functions are pure and take/return torch tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quantcal.qmath import group_view, ungroup


@dataclass(frozen=True)
class MatMulNBitsWeight:
    """The constant inputs and attributes of one MatMulNBits node."""

    B: torch.Tensor  # (N, G, blob) uint8
    scales: torch.Tensor  # (N, G) float
    zero_points: torch.Tensor | None  # (N, ceil(G * bits / 8)) uint8, or None (symmetric)
    K: int
    N: int
    bits: int
    block_size: int

    @property
    def n_blocks(self) -> int:
        return self.B.shape[1]

    @property
    def nbytes(self) -> int:
        zp = 0 if self.zero_points is None else self.zero_points.numel()
        return self.B.numel() + self.scales.numel() * self.scales.element_size() + zp


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes along the last axis, low bits first: ``(..., L)`` -> ``(..., L*bits/8)``.

    ``L * bits`` must be a multiple of 8 (pad first). ``bits`` is 2, 4 or 8.
    """
    if bits == 8:
        return q.to(torch.uint8)
    per_byte = 8 // bits
    q = q.to(torch.uint8).reshape(*q.shape[:-1], -1, per_byte)  # (..., L/per_byte, per_byte)
    out = torch.zeros(q.shape[:-1], dtype=torch.uint8)
    for j in range(per_byte):
        out |= (q[..., j] & ((1 << bits) - 1)) << (bits * j)
    return out


def unpack_codes(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``(..., B)`` bytes -> ``(..., length)`` codes."""
    if bits == 8:
        return packed[..., :length].to(torch.uint8)
    per_byte = 8 // bits
    parts = [(packed >> (bits * j)) & ((1 << bits) - 1) for j in range(per_byte)]
    q = torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], -1)  # (..., B*per_byte)
    return q[..., :length].to(torch.uint8)


def _pad_last(x: torch.Tensor, multiple: int, value: int) -> torch.Tensor:
    pad = -x.shape[-1] % multiple
    return torch.nn.functional.pad(x, (0, pad), value=value) if pad else x


def pack_matmulnbits(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    block_size: int,
    scale_dtype: torch.dtype = torch.float32,
) -> MatMulNBitsWeight:
    """Pack ``(N, K)`` codes with ``(N, G)`` qparams into MatMulNBits inputs.

    Args:
        q: unsigned codes, ``(N, K)``, values below ``2**bits``.
        scale: ``(N, G)`` scales, ``G = ceil(K / block_size)``.
        zero: ``(N, G)`` integer-valued zero points, or None for symmetric (``2**(bits-1)``).
        scale_dtype: dtype of the model's activations (fp16 on GPU, fp32 on CPU).
    """
    n, k = q.shape
    groups = math.ceil(k / block_size)
    if scale.shape != (n, groups):
        raise ValueError(f"scale shape {tuple(scale.shape)} != {(n, groups)}")
    blocks = group_view(q, block_size)  # (N, G, block) zero-padded along K
    b = pack_codes(blocks, bits)  # (N, G, block*bits/8)
    zp = None
    if zero is not None:
        codes = zero.round().to(torch.uint8)  # (N, G)
        zp = pack_codes(_pad_last(codes, 8 // bits, 1 << (bits - 1)), bits)
    return MatMulNBitsWeight(
        B=b.contiguous(), scales=scale.to(scale_dtype).contiguous(),
        zero_points=None if zp is None else zp.contiguous(),
        K=k, N=n, bits=bits, block_size=block_size,
    )


def unpack_matmulnbits(w: MatMulNBitsWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes ``(N, K)``, scales ``(N, G)`` float32 and zero points ``(N, G)`` back out."""
    groups = w.n_blocks
    q = ungroup(unpack_codes(w.B, w.bits, w.block_size), w.K)  # (N, K)
    scale = w.scales.float().reshape(w.N, groups)
    if w.zero_points is None:
        zero = torch.full((w.N, groups), float(1 << (w.bits - 1)))
    else:
        zero = unpack_codes(w.zero_points, w.bits, groups).float()
    return q, scale, zero


def dequantize_matmulnbits(w: MatMulNBitsWeight) -> torch.Tensor:
    """The ``(N, K)`` float32 weight MatMulNBits multiplies by (the torch reference)."""
    q, scale, zero = unpack_matmulnbits(w)
    qg = group_view(q.float(), w.block_size)  # (N, G, block)
    return ungroup((qg - zero.unsqueeze(-1)) * scale.unsqueeze(-1), w.K)


@dataclass(frozen=True)
class GatherBlockQuantizedWeight:
    """The constant inputs and attributes of one GatherBlockQuantized node."""

    data: torch.Tensor  # (V, G * blob) uint8
    scales: torch.Tensor  # (V, G) float
    zero_points: torch.Tensor | None  # (V, ceil(G * bits / 8)) uint8, or None (symmetric)
    K: int
    bits: int
    block_size: int

    @property
    def width(self) -> int:
        """Columns the node returns: K padded to whole blocks."""
        return self.scales.shape[1] * self.block_size


def pack_gather_block_quantized(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    block_size: int,
    blocks: int | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> GatherBlockQuantizedWeight:
    """Pack a ``(V, K)`` table's codes with ``(V, G)`` qparams into GatherBlockQuantized inputs.

    Args:
        q, scale, zero, bits, block_size, scale_dtype: as for :func:`pack_matmulnbits`.
        blocks: blocks per row to store (default ``G``); more appends padding blocks, which
            the graph slices off (see ``BlockQuant.gather_blocks``).
    """
    v, k = q.shape
    groups = math.ceil(k / block_size)
    blocks = blocks or groups
    if blocks > groups:  # (V, blocks * block) codes; padding blocks hold zeros
        q = torch.nn.functional.pad(q, (0, blocks * block_size - k))
        scale = torch.nn.functional.pad(scale, (0, blocks - groups), value=1.0)
        if zero is not None:
            zero = torch.nn.functional.pad(zero, (0, blocks - groups),
                                           value=float(1 << (bits - 1)))
    w = pack_matmulnbits(q, scale, zero, bits, block_size, scale_dtype)
    return GatherBlockQuantizedWeight(
        data=w.B.reshape(v, -1), scales=w.scales, zero_points=w.zero_points, K=k, bits=bits,
        block_size=block_size)
