"""The format vocabulary every stage speaks: ``fp16``, ``int8``, ``int4-gN``, ``w8a8``.

A format is a frozen dataclass; stages dispatch on its *type* (``type(fmt)``), never on its
name. ``parse_format`` turns the strings users write (CLI flags, ``plan.json``) into formats
and rejects anything else with a message listing what exists. ``Format.name`` is the
canonical spelling and round-trips through ``parse_format``.

A format class declares here all of itself that needs no torch: its math (bits, groups),
its size (:meth:`Format.weight_bytes`, :meth:`Format.float_bytes` and their embedding
variants), its speed (the layout the export emits, the latency model's kernel family, the
nodes and bytes of one decode step) and its roles (fusable, embeddable, static activation
scale). Its stage handlers (qparams, fake-quant, ONNX emitter) are one
:class:`~quantcal.formatspec.FormatSpec` in :mod:`quantcal.formatdefs`, and
:func:`quantcal.formatspec.check_formats` refuses any concrete format lacking a piece of
either half. A family of formats that is not one itself says so: ``class X(Format,
base=True)``.

Sizes are counted the way the exported ONNX model stores them: an ``(N, K)`` weight of a
MatMulNBits format holds ``ceil(K / group)`` blocks per output row, each block of
``group * bits / 8`` bytes plus one fp16 scale and, when asymmetric, one packed zero point.
A token embedding ``(V, H)`` in a block format is stored the same way (GatherBlockQuantized,
groups along H), see :meth:`Format.embedding_bytes`; :func:`shares_tied_weight` says when a
tied head and its embedding are stored once.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

from quantcal.errors import QuantcalError

INT4_GROUP_SIZES = (32, 64, 128)
INT8_GROUP_SIZES = (32, 64, 128, 256)
SCALE_BITS = 16  # scales are stored in fp16 (the activation dtype on GPU)

# the layouts the export emits (quantcal.latency names more, for its kernel bench)
MATMUL = "matmul"  # fp16: a plain MatMul
PLAIN = "plain"  # MatMulNBits with the weights as quantcal exports them
QDQ = "qdq"  # QuantizeLinear / DequantizeLinear around an fp MatMul
EXPORT_LAYOUTS = (MATMUL, PLAIN, QDQ)
# the latency model's bandwidth families
NBITS_KERNEL = "matmulnbits"
DENSE_KERNEL = "matmul"
KERNEL_FAMILIES = (NBITS_KERNEL, DENSE_KERNEL)


@dataclass(frozen=True)
class Format:
    """Base of all formats. Subclasses are the vocabulary; do not add state here.

    A concrete subclass overrides ``name``, ``weight_bits``, ``weight_bytes`` and
    ``float_bytes`` and sets ``export_layout`` and ``kernel_family``; the other traits
    default to the cautious answer (not fused, no embedding, no activation quantizer).
    """

    is_base: ClassVar[bool] = True  # a family of formats, not one (see __init_subclass__)
    export_layout: ClassVar[str | None] = None  # one of EXPORT_LAYOUTS
    kernel_family: ClassVar[str | None] = None  # one of KERNEL_FAMILIES
    nodes_per_projection: ClassVar[int] = 1  # nodes the export emits per projection
    fusable: ClassVar[bool] = False  # projections sharing it and their input: one node
    embeddable: ClassVar[bool] = False  # a token embedding may take it
    static_activations: ClassVar[bool] = False  # quantizes its input with a static scale

    def __init_subclass__(cls, base: bool = False, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.is_base = base

    @property
    def name(self) -> str:
        raise NotImplementedError

    @property
    def weight_bits(self) -> int:
        raise NotImplementedError

    def weight_bytes(self, n: int, k: int) -> int:
        """Bytes an (N out, K in) weight takes in the exported model, scales included."""
        raise NotImplementedError

    def float_bytes(self, n: int, k: int) -> int:
        """Bytes of an (N, K) weight's floating-point tensors in the fp16 export (a whole
        fp16 weight; a quantized one's scales): the CPU export stores them in fp32."""
        raise NotImplementedError

    def bits_per_weight(self, n: int, k: int) -> float:
        """Average stored bits per weight element of an (N, K) weight, overhead counted."""
        return 8.0 * self.weight_bytes(n, k) / (n * k)

    def embedding_bytes(self, v: int, h: int) -> int:
        """Bytes a ``(V, H)`` token embedding table takes in the exported model."""
        return self.weight_bytes(v, h)

    def embedding_float_bytes(self, v: int, h: int) -> int:
        """:meth:`float_bytes` of a ``(V, H)`` token embedding table."""
        return self.float_bytes(v, h)

    def decode_bytes(self, n: int, k: int) -> int:
        """Bytes one decode step moves for an (N, K) projection as the export emits it
        (the latency model's traffic): by default, the stored weight."""
        return self.weight_bytes(n, k)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class FP16(Format):
    """Unquantized: fp16 weights, emitted as a plain MatMul (an embedding: a Gather)."""

    export_layout = MATMUL
    kernel_family = DENSE_KERNEL
    fusable = True  # MatMul weights concatenate along N
    embeddable = True

    @property
    def name(self) -> str:
        return "fp16"

    @property
    def weight_bits(self) -> int:
        return 16

    def weight_bytes(self, n: int, k: int) -> int:
        return 2 * n * k

    def float_bytes(self, n: int, k: int) -> int:
        return 2 * n * k


@dataclass(frozen=True)
class BlockQuant(Format, base=True):
    """Weight-only quantization per group of ``group_size`` input channels (MatMulNBits).

    Weights are stored as unsigned codes ``q`` with ``w ~ (q - zero_point) * scale``; a
    symmetric format stores no zero points (MatMulNBits then uses ``2**(bits-1)``). A token
    embedding is a GatherBlockQuantized table of the same blocks.
    """

    export_layout = PLAIN
    kernel_family = NBITS_KERNEL
    fusable = True  # MatMulNBits quantizes each output row alone: rows concatenate
    embeddable = True

    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        allowed = INT4_GROUP_SIZES if self.weight_bits == 4 else INT8_GROUP_SIZES
        if self.group_size not in allowed:
            raise QuantcalError(
                f"{self.weight_bits}-bit group size {self.group_size} is not supported; "
                f"use one of {', '.join(map(str, allowed))}"
            )

    @property
    def bits(self) -> int:
        return self.weight_bits

    def n_blocks(self, k: int) -> int:
        return math.ceil(k / self.group_size)

    def weight_bytes(self, n: int, k: int) -> int:
        blocks = self.n_blocks(k)
        codes = blocks * self.group_size * self.bits // 8
        scales = blocks * SCALE_BITS // 8
        zeros = 0 if self.symmetric else math.ceil(blocks * self.bits / 8)
        return n * (codes + scales + zeros)

    def gather_blocks(self, k: int) -> int:
        """Blocks per row of a GatherBlockQuantized table of K columns: ``n_blocks(k)``, made
        even for asymmetric 4-bit. onnxruntime's CPU kernel packs 4-bit zero points per row,
        its CUDA kernels across rows, and the two agree only when a row has an even number of
        blocks; the extra block is padding the graph slices off."""
        blocks = self.n_blocks(k)
        return blocks + blocks % 2 if self.bits == 4 and not self.symmetric else blocks

    def embedding_bytes(self, v: int, h: int) -> int:
        return self.weight_bytes(v, self.gather_blocks(h) * self.group_size)

    def float_bytes(self, n: int, k: int) -> int:
        return n * self.n_blocks(k) * 2  # one scale per block

    def embedding_float_bytes(self, v: int, h: int) -> int:
        return v * self.gather_blocks(h) * 2


@dataclass(frozen=True)
class Int4(BlockQuant):
    """``int4-gN``: 4-bit weights per group of N (32, 64, 128), fp16 activations."""

    group_size: int = 128

    @property
    def weight_bits(self) -> int:
        return 4

    @property
    def name(self) -> str:
        return f"int4-g{self.group_size}" + ("-sym" if self.symmetric else "")


@dataclass(frozen=True)
class Int8(BlockQuant):
    """``int8``: 8-bit weights per group (default 128), fp16 activations, MatMulNBits bits=8."""

    group_size: int = 128

    @property
    def weight_bits(self) -> int:
        return 8

    @property
    def name(self) -> str:
        base = "int8" if self.group_size == 128 else f"int8-g{self.group_size}"
        return base + ("-sym" if self.symmetric else "")


@dataclass(frozen=True)
class W8A8(Format):
    """``w8a8``: int8 weights per output channel (symmetric), int8 activations per tensor
    with a static scale from calibration; emitted as QuantizeLinear/DequantizeLinear.
    Each layer quantizes its own input, so no two fuse, and an embedding has no input."""

    export_layout = QDQ
    kernel_family = DENSE_KERNEL
    nodes_per_projection = 4  # Q and DQ of the activation, DQ of the weight, the MatMul
    static_activations = True

    @property
    def name(self) -> str:
        return "w8a8"

    @property
    def weight_bits(self) -> int:
        return 8

    def weight_bytes(self, n: int, k: int) -> int:
        return n * k + n * SCALE_BITS // 8  # int8 codes + one scale per output channel

    def float_bytes(self, n: int, k: int) -> int:
        return 2 * n  # one weight scale per output channel (int8 codes)

    def decode_bytes(self, n: int, k: int) -> int:
        return 5 * n * k  # DQ reads int8 and writes fp16 weights, the MatMul reads them


_PATTERN = re.compile(r"^(fp16|w8a8|int8|int4)(?:-g(\d+))?(-sym)?$")


def shares_tied_weight(embedding: Format, head: Format, hidden: int) -> bool:
    """Whether a head tied to the embedding is stored once with it: both fp16 (the head
    multiplies by the embedding table), or the same block format with a table that needs no
    padding (:meth:`BlockQuant.gather_blocks`), whose GatherBlockQuantized reads the head's
    MatMulNBits weight. Otherwise each is stored in its own format."""
    if embedding != head:
        return False
    return isinstance(embedding, FP16) or (
        isinstance(embedding, BlockQuant)
        and embedding.gather_blocks(hidden) == embedding.n_blocks(hidden))


def parse_format(text: str | Format) -> Format:
    """Parse ``fp16 | int8[-gN] | int4-gN | w8a8`` (``-sym`` suffix for symmetric)."""
    if isinstance(text, Format):
        return text
    m = _PATTERN.match(str(text).strip().lower())
    if m is None:
        raise QuantcalError(
            f"unknown format {text!r}; known formats: fp16, int8, "
            + ", ".join(f"int4-g{g}" for g in INT4_GROUP_SIZES)
            + ", w8a8 (int8/int4 take -gN for the group size and -sym for symmetric)"
        )
    kind, group, sym = m.group(1), m.group(2), m.group(3) is not None
    if kind in ("fp16", "w8a8"):
        if group or sym:
            raise QuantcalError(f"format {text!r}: {kind} takes no group size or -sym suffix")
        return FP16() if kind == "fp16" else W8A8()
    if kind == "int4":
        if group is None:
            raise QuantcalError(f"format {text!r}: int4 needs a group size, e.g. int4-g128")
        return Int4(group_size=int(group), symmetric=sym)
    return Int8(group_size=int(group) if group else 128, symmetric=sym)


def parse_formats(text: str) -> tuple[Format, ...]:
    """Parse a comma-separated list of formats, e.g. ``"int8,int4-g128"``."""
    items = [t for t in (s.strip() for s in text.split(",")) if t]
    if not items:
        raise QuantcalError("empty format list; name at least one format, e.g. int4-g128")
    return tuple(parse_format(t) for t in items)


DEFAULT_CANDIDATES: tuple[Format, ...] = (Int8(), Int4(128), Int4(32))
