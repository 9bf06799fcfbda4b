"""Kernel latency tables: what one projection costs per decode step, measured or modelled.

A table (JSON with ``schema_version``) describes one device and onnxruntime version: the
median microseconds of one-node ONNX graphs, per (format, layout, N, K, M, fused), as
``quantcal bench kernels`` measures them (:mod:`quantcal.evaluate.kernels`). An entry's
``parts`` are the output widths of the projections it computes: one part is one node;
several parts with ``fused`` are one node of N = their sum (q, k, v or gate, up); several
without ``fused`` are one node per part, timed together in one graph.

Where a table has no entry, a bandwidth model stands in, for M = 1 (decode) only:
``latency = nodes x node_us + bytes / bandwidth`` (the bytes of the weights as the export
stores them; the bandwidth per kernel family). Every lookup says whether it was measured.
The table shipped with quantcal (``quantcal/data/latency_h100.json``, :func:`default_table`)
holds the issue #14 figures (H100, CUDA graph replay) and a model fitted to them and to the
README's decode speeds; its ``source`` fields say which number came from where.

Reads the JSON it is given (or the shipped one); writes nothing.
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

from quantcal.config import Strict
from quantcal.errors import QuantcalError
from quantcal.formats import DENSE_KERNEL, MATMUL, NBITS_KERNEL, PLAIN, QDQ, Format

SHIPPED = Path(__file__).resolve().parent / "data" / "latency_h100.json"

# how a projection's weights are laid out for its kernel: the layouts a format's
# export_layout names (MATMUL, PLAIN, QDQ, from quantcal.formats), and those only timed
FPA_INTB = "fpa_intb"  # MatMulNBits, onnxruntime's fpA_intB path switched on (packs at load)
PREPACKED = "prepacked"  # MatMulNBits weight_prepacked=1: stored in the SM80 fpA_intB layout
PREPACKED_SM90 = "prepacked-sm90"  # weight_prepacked=2: the Hopper layout
LAYOUTS = (MATMUL, PLAIN, FPA_INTB, PREPACKED, PREPACKED_SM90, QDQ)
# the model's bandwidth families (a format's kernel_family): NBITS_KERNEL, DENSE_KERNEL


def kernel_name(bits: int, block: int, symmetric: bool) -> str:
    """The name of a weight format as tables write it: a quantcal format name where one
    exists (``fp16``, ``int8``, ``int4-g32-sym``), ``int4-g16`` etc. where not."""
    if bits == 16:
        return "fp16"
    base = "int8" if bits == 8 and block == 128 else f"int{bits}-g{block}"
    return base + ("-sym" if symmetric else "")


_KERNEL = re.compile(r"^(fp16|int8|int4)(?:-g(\d+))?(-sym)?$")


def parse_kernel(name: str) -> tuple[int, int, bool]:
    """``(bits, block, symmetric)`` of a kernel name (block 0 for fp16); any power-of-two
    block of at least 16, as MatMulNBits takes, not only quantcal's group sizes."""
    m = _KERNEL.match(name.strip().lower())
    bad = QuantcalError(f"unknown kernel format {name!r}; write fp16, int8[-gN][-sym] or "
                        "int4-gN[-sym] with N a power of two of at least 16, e.g. int4-g16")
    if m is None:
        raise bad
    kind, group, sym = m.group(1), m.group(2), m.group(3) is not None
    if kind == "fp16":
        if group or sym:
            raise bad
        return 16, 0, False
    block = int(group) if group else (128 if kind == "int8" else 0)
    if block < 16 or block & (block - 1):
        raise bad
    return (8 if kind == "int8" else 4), block, sym


def kernel_bytes(name: str, n: int, k: int) -> int:
    """Bytes of an (N, K) weight of kernel format ``name`` as MatMul / MatMulNBits store it:
    codes, fp16 scales and packed zero points (quantcal's ``Format.weight_bytes``)."""
    bits, block, symmetric = parse_kernel(name)
    if bits == 16:
        return 2 * n * k
    blocks = math.ceil(k / block)
    zeros = 0 if symmetric else math.ceil(blocks * bits / 8)
    return n * (blocks * block * bits // 8 + 2 * blocks + zeros)


def export_layout(fmt: Format) -> str:
    """The layout the export emits for ``fmt`` (the one a plan's latency is read for), as
    the format declares it (``Format.export_layout``)."""
    return fmt.export_layout


def fusable(fmt: Format) -> bool:
    """Whether projections sharing ``fmt`` and their input can be one node, as the format
    declares it (MatMul and MatMulNBits concatenate along N; a QDQ chain per weight does
    not)."""
    return fmt.fusable


@dataclass(frozen=True)
class KernelEntry(Strict):
    """One measured node (or group of nodes): its median latency in microseconds."""

    format: str  # a kernel name (kernel_name)
    layout: str
    parts: list[int]  # N of each projection
    k: int
    m: int
    fused: bool  # one node of N = sum(parts); False: one node per part
    median_us: float
    repeats: int = 0
    cuda_graph: bool = False  # timed as CUDA-graph replays

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise QuantcalError(f"unknown layout {self.layout!r}; use {', '.join(LAYOUTS)}")
        if not (self.parts and min(self.parts) > 0 and self.k > 0 and self.m > 0):
            raise QuantcalError(f"entry {self.format} {self.parts}x{self.k}: sizes must be "
                                "positive")
        if not (math.isfinite(self.median_us) and self.median_us > 0):
            raise QuantcalError(f"entry {self.format} {self.parts}x{self.k} m={self.m}: "
                                f"median_us must be a positive number, got {self.median_us}")

    @property
    def n(self) -> int:
        return sum(self.parts)


@dataclass(frozen=True)
class LatencyModel(Strict):
    """``nodes x node_us + bytes / bandwidth`` at M = 1, for nodes no entry measured."""

    bandwidth_gb_s: dict[str, float]  # per kernel family: matmulnbits, matmul
    node_us: float  # fixed cost of a node beyond the bytes it reads
    source: str = ""

    def __post_init__(self) -> None:
        for family in (NBITS_KERNEL, DENSE_KERNEL):
            value = self.bandwidth_gb_s.get(family)
            if value is None or not (math.isfinite(value) and value > 0):
                raise QuantcalError(f"latency model: bandwidth_gb_s.{family} must be a "
                                    f"positive number, got {value}")
        if not (math.isfinite(self.node_us) and self.node_us >= 0):
            raise QuantcalError(f"latency model: node_us must be 0 or more, got {self.node_us}")


@dataclass(frozen=True)
class LatencyTable(Strict):
    """A device's kernel latencies; see the module docstring."""

    versioned: ClassVar[bool] = True

    device: str
    provider: str  # cuda | cpu
    onnxruntime: str
    activation_dtype: str  # float16 (CUDA) | float32 (CPU)
    entries: list[KernelEntry] = field(default_factory=list)
    model: LatencyModel | None = None
    # per decode step, beside the planned projections (see overhead_source)
    block_overhead_us: float = 0.0
    token_overhead_us: float = 0.0
    overhead_source: str = ""
    source: str = ""
    unsupported: dict[str, str] = field(default_factory=dict)  # "format layout" -> why
    notes: list[str] = field(default_factory=list)
    created: str = ""

    def __post_init__(self) -> None:
        for name in ("block_overhead_us", "token_overhead_us"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise QuantcalError(f"latency table: {name} must be 0 or more, got {value}")

    @functools.cached_property
    def _index(self) -> dict[tuple, float]:
        return {(e.format, e.layout, tuple(e.parts), e.k, e.m, e.fused): e.median_us
                for e in self.entries}

    def node_us(self, fmt: Format, parts: Sequence[int], k: int, *, fused: bool,
                m: int = 1) -> tuple[float, bool]:
        """Microseconds of projections ``parts`` x ``k`` in ``fmt`` as the export emits
        them (one node of N = sum(parts) when ``fused``), and whether that was measured.

        Raises:
            QuantcalError: no entry, and M is not 1 or the table has no model.
        """
        name, layout, parts = fmt.name, export_layout(fmt), tuple(parts)
        if fused and not fusable(fmt):
            raise QuantcalError(f"{fmt.name} projections are not fused by the export")
        keys = [(name, layout, parts, k, m, fused)]
        if fused:  # the fused node is a node of N = sum(parts)
            keys.append((name, layout, (sum(parts),), k, m, False))
        for key in keys:
            if key in self._index:
                return self._index[key], True
        if len(parts) > 1 and not fused:
            singles = [self.node_us(fmt, (n,), k, fused=False, m=m) for n in parts]
            return sum(t for t, _ in singles), all(measured for _, measured in singles)
        return self._modelled(fmt, parts, k, m), False

    def _modelled(self, fmt: Format, parts: tuple[int, ...], k: int, m: int) -> float:
        if self.model is None or m != 1:
            raise QuantcalError(
                f"the latency table for {self.device} has no entry for {fmt.name} "
                f"{'+'.join(map(str, parts))}x{k} at M={m}"
                + ("" if self.model is None else " and its model covers M=1 only")
                + "; run `quantcal bench kernels` with that shape")
        # the format's decode traffic and nodes: several parts here are one fused node
        nbytes = sum(fmt.decode_bytes(n, k) for n in parts)
        nodes, family = fmt.nodes_per_projection, fmt.kernel_family
        return nodes * self.model.node_us + nbytes / (self.model.bandwidth_gb_s[family] * 1e3)

    def describe(self) -> str:
        """One phrase naming the table: its device, provider and onnxruntime."""
        return f"{self.device} ({self.provider}, onnxruntime {self.onnxruntime})"


def load_table(path: str | os.PathLike) -> LatencyTable:
    """A latency table from ``path`` (one line naming the file when it is not one)."""
    from quantcal.rundir import read_record

    return read_record(path, LatencyTable, "quantcal bench kernels")


@functools.lru_cache(maxsize=1)
def default_table() -> LatencyTable:
    """The table shipped with quantcal (H100, onnxruntime 1.31.1; see its sources)."""
    return load_table(SHIPPED)


def cache_path(device: str, onnxruntime: str) -> Path:
    """Where ``quantcal bench kernels`` keeps a device's table by default:
    ``$XDG_CACHE_HOME/quantcal`` (``~/.cache/quantcal``), one file per device and version."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "quantcal"
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "device"
    return root / f"kernels-{slug}-ort{onnxruntime}.json"
