"""Emission of one quantized linear layer (or the token embedding) into an ONNX graph, one
emitter per format type.

``emit_linear`` looks the emitter up by ``type(fmt)`` (never by name) in the format's
:class:`~quantcal.formatspec.FormatSpec` (declared in :mod:`quantcal.formatdefs`, which
names the emitters and op counts below) and appends the nodes and initializers of
``y = x @ w_hat^T + b`` to a :class:`GraphBuilder`, where ``w_hat`` is the weight
:func:`quantcal.fakequant.quantized_weight` gives (the torch reference):

- ``fp16``: ``MatMul`` by the transposed weight, stored in the activation dtype.
- ``int4-gN`` / ``int8``: ``MatMulNBits`` (com.microsoft) from :func:`pack_matmulnbits`;
  GPTQ codes when the qparams hold them; zero points only for asymmetric formats.
- ``w8a8``: QDQ. The input goes through ``QuantizeLinear``/``DequantizeLinear`` with the
  static uint8 activation scale; the weight is stored as signed int8 ``(K, N)`` with a
  per-output-channel ``DequantizeLinear(axis=1)``; then ``MatMul``.

A bias is always a separate ``Add``. ``emit_embedding`` gathers rows of the token embedding:
``Gather`` from an fp16 table, or ``GatherBlockQuantized`` (com.microsoft, uint8 data,
``quantize_axis=1``) from a block-quantized one, sliced to H when its blocks are padded;
``gather_shared`` does the same from a tied head's MatMulNBits initializers (``B`` reshaped
to 2-D), so the table is stored once. Nodes are named ``{node_prefix(layer)}/{Op}``
(``/model/layers.0/mlp/down_proj/MatMulNBits``), initializers ``{layer}.{role}``
(``model.layers.0.mlp.down_proj.weight_q``), so both are deterministic and unique per layer.
``planned_op_counts`` and ``graph_op_counts`` count the nodes a plan implies and a graph
holds, keyed alike (a fused node once for the layers it serves, :mod:`quantcal.export.fusion`).
Reads and writes nothing but the builder it is given.
"""

from __future__ import annotations

from collections import Counter
from typing import Collection, Mapping, Sequence

import numpy as np
import onnx
import torch

from quantcal import qmath
from quantcal.errors import QuantcalError
from quantcal.export.builder import MS_DOMAIN, GraphBuilder, node_prefix
from quantcal.formats import FP16, W8A8, BlockQuant, Format
from quantcal.formatspec import spec_of, specs
from quantcal.packing import MatMulNBitsWeight, pack_gather_block_quantized, pack_matmulnbits

ACT_BITS = 8
QParams = Mapping[str, torch.Tensor]


def _np(t: torch.Tensor, dtype: np.dtype | type) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy().astype(dtype)


def add_bias(b: GraphBuilder, layer: str, y: str, bias: torch.Tensor | None) -> str:
    """``y + bias`` as the layer's ``Add`` (``y`` itself when there is no bias)."""
    if bias is None:
        return y
    name = b.initializer(f"{layer}.bias", _np(bias, b.dtype))  # (N,)
    return b.node("Add", [y, name], name=f"{node_prefix(layer)}/Add")[0]


def emit_matmul(b: GraphBuilder, layer: str, x: str, w: torch.Tensor, fmt: FP16,
                qp: QParams, act_qp: QParams | None) -> str:
    """fp16: ``MatMul`` by the transposed weight."""
    wt = b.initializer(f"{layer}.weight", _np(w.t(), b.dtype))  # (K, N)
    return b.node("MatMul", [x, wt], name=f"{node_prefix(layer)}/MatMul")[0]


def _block_codes(fmt: BlockQuant, w: torch.Tensor, qp: QParams) -> torch.Tensor:
    """The ``(N, K)`` uint8 codes: GPTQ's when present, else rounded from the qparams."""
    codes = qp.get("codes")
    if codes is None:
        codes = qmath.quantize_weight(w.float().cpu(), qp["scale"].cpu(), qp["zero"].cpu(),
                                      fmt.bits, fmt.group_size)
    return codes.cpu().to(torch.uint8)


def _block_qparams(layer: str, fmt: BlockQuant, w: torch.Tensor, qp: QParams
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Codes ``(N, K)``, scales ``(N, G)`` and zero points ``(N, G)`` (None if symmetric)."""
    scale, zero = qp["scale"].cpu().float(), qp["zero"].cpu().float()  # (N, G) each
    if fmt.symmetric and not bool((zero == float(1 << (fmt.bits - 1))).all()):
        raise QuantcalError(f"{layer}: {fmt.name} qparams have zero points other than "
                            f"{1 << (fmt.bits - 1)}; re-run `quantcal calibrate`")
    return _block_codes(fmt, w, qp), scale, None if fmt.symmetric else zero


def pack_block(layer: str, fmt: BlockQuant, w: torch.Tensor, qp: QParams
               ) -> MatMulNBitsWeight:
    """The MatMulNBits weight of ``layer``'s ``(N, K)`` weight under its qparams."""
    return pack_matmulnbits(*_block_qparams(layer, fmt, w, qp), fmt.bits, fmt.group_size)


def block_initializers(b: GraphBuilder, layer: str, packed: MatMulNBitsWeight) -> list[str]:
    """``B``, scales and (asymmetric) zero points of a MatMulNBits weight, as initializers."""
    names = [
        b.initializer(f"{layer}.weight_q", packed.B.numpy()),  # (N, G, blob) uint8
        b.initializer(f"{layer}.weight_scales", _np(packed.scales, b.dtype)),  # (N, G)
    ]
    if packed.zero_points is not None:  # (N, ceil(G * bits / 8)) uint8
        names.append(b.initializer(f"{layer}.weight_zp", packed.zero_points.numpy()))
    return names


def matmulnbits(b: GraphBuilder, layer: str, x: str, weight: list[str],
                packed: MatMulNBitsWeight) -> str:
    """``x @ dequant(B)^T`` from the initializers :func:`block_initializers` named."""
    return b.node("MatMulNBits", [x, *weight], name=f"{node_prefix(layer)}/MatMulNBits",
                  domain=MS_DOMAIN, K=packed.K, N=packed.N, bits=packed.bits,
                  block_size=packed.block_size, accuracy_level=0)[0]


def emit_matmulnbits(b: GraphBuilder, layer: str, x: str, w: torch.Tensor, fmt: BlockQuant,
                     qp: QParams, act_qp: QParams | None) -> str:
    """A block format: ``MatMulNBits`` of the weight :func:`pack_block` packs."""
    packed = pack_block(layer, fmt, w, qp)
    return matmulnbits(b, layer, x, block_initializers(b, layer, packed), packed)


def emit_qdq(b: GraphBuilder, layer: str, x: str, w: torch.Tensor, fmt: W8A8,
             qp: QParams, act_qp: QParams | None) -> str:
    """w8a8: the input and the weight through QuantizeLinear/DequantizeLinear, then MatMul."""
    if act_qp is None:
        raise QuantcalError(f"{layer}: w8a8 needs the layer's activation qparams; re-run "
                            "`quantcal calibrate` with w8a8 among --formats")
    prefix = node_prefix(layer)
    a_scale = b.initializer(f"{layer}.input_scale", _np(act_qp["scale"].reshape(()), b.dtype))
    a_zero = b.initializer(f"{layer}.input_zero",
                           act_qp["zero"].reshape(()).cpu().round().numpy().astype(np.uint8))
    xq = b.node("QuantizeLinear", [x, a_scale, a_zero], name=f"{prefix}/QuantizeLinear")[0]
    xdq = b.node("DequantizeLinear", [xq, a_scale, a_zero],
                 name=f"{prefix}/DequantizeLinear")[0]

    scale, zero = qp["scale"].cpu().float(), qp["zero"].cpu().float()  # (N, 1) each
    q = qmath.quantize_weight(w.float().cpu(), scale, zero, 8, None)  # (N, K) uint8
    # (q - z) * s == ((q - 128) - (z - 128)) * s: signed codes, signed zero points
    q_signed = (q.to(torch.int16) - 128).to(torch.int8).t()  # (K, N)
    zero_signed = (zero.round().reshape(-1) - 128).to(torch.int8)  # (N,)
    w_q = b.initializer(f"{layer}.weight_q", q_signed.contiguous().numpy())
    w_scale = b.initializer(f"{layer}.weight_scale", _np(scale.reshape(-1), b.dtype))  # (N,)
    w_zero = b.initializer(f"{layer}.weight_zero", zero_signed.numpy())
    w_dq = b.node("DequantizeLinear", [w_q, w_scale, w_zero],
                  name=f"{prefix}/weight/DequantizeLinear", axis=1)[0]  # (K, N)
    return b.node("MatMul", [xdq, w_dq], name=f"{prefix}/MatMul")[0]


def emit_linear(b: GraphBuilder, layer: str, x: str, weight: torch.Tensor,
                bias: torch.Tensor | None, fmt: Format, qp: QParams,
                act_qp: QParams | None = None) -> str:
    """Append ``y = x @ w_hat^T + bias`` for one layer in format ``fmt``.

    Args:
        b: the graph under construction; ``b.dtype`` is the activation dtype.
        layer: module name (``model.layers.0.mlp.down_proj``); names nodes and initializers.
        x: name of the input tensor, ``(..., K)`` in ``b.dtype``.
        weight: the ``(N, K)`` float weight (Conv1D weights transposed first).
        bias: ``(N,)`` or None.
        fmt: the layer's format.
        qp: the layer's qparams for ``fmt`` (``{}`` for fp16).
        act_qp: static activation ``{scale, zero}`` (w8a8 only).
    Returns:
        The name of the output tensor, ``(..., N)`` in ``b.dtype``.
    """
    spec = specs().get(type(fmt))
    if spec is None:
        raise QuantcalError(f"{layer}: no ONNX emitter for format {fmt!r}; known: "
                            + ", ".join(t.__name__ for t in specs()))
    y = spec.emit_linear(b, layer, x, weight.detach(), fmt, qp, act_qp)
    return add_bias(b, layer, y, bias)


def _gather_block_quantized(b: GraphBuilder, layer: str, ids: str, weight: list[str],
                            fmt: BlockQuant, k: int, width: int) -> str:
    """GatherBlockQuantized of ``weight`` (data ``(V, G * blob)``, scales[, zero points]) at
    ``ids``, sliced from ``width`` (whole blocks) to ``k`` columns.

    A symmetric table gets its zero points anyway: onnxruntime's kernels have disagreed on
    the default (CPU ``2**(bits-1)``, CUDA 0 in some releases). ConstantOfShape makes them
    (folded to a constant at session start; nothing stored, so sizes stay as counted); every
    packed nibble is the midpoint, so per-row (CPU) and across-row (CUDA) indexing agree."""
    p = node_prefix(layer)
    if len(weight) == 2:
        rows, blocks = next(t.dims for t in b.initializers if t.name == weight[1])  # scales
        shape = b.const(f"{layer}.zero_points_shape", [rows, -(-blocks * fmt.bits // 8)])
        mid = 1 << (fmt.bits - 1)
        value = onnx.helper.make_tensor("value", onnx.TensorProto.UINT8, [1],
                                        [mid * 0x11 if fmt.bits == 4 else mid])
        weight = [*weight, b.node("ConstantOfShape", [shape], name=f"{p}/ConstantOfShape",
                                  value=value)[0]]
    (y,) = b.node("GatherBlockQuantized", [weight[0], ids, *weight[1:]],
                  name=f"{p}/GatherBlockQuantized", domain=MS_DOMAIN, bits=fmt.bits,
                  block_size=fmt.group_size, gather_axis=0, quantize_axis=1)  # (..., width)
    if width == k:
        return y
    bounds = [b.const(f"{layer}.slice_{n}", [v]) for n, v in (("starts", 0), ("ends", k),
                                                              ("axes", -1))]
    return b.node("Slice", [y, *bounds], name=f"{p}/Slice")[0]  # (..., K)


def emit_embedding(b: GraphBuilder, layer: str, ids: str, table: torch.Tensor, fmt: Format,
                   qp: QParams) -> str:
    """Append the rows ``ids`` of a token embedding in format ``fmt``.

    Args:
        layer: module name (``model.embed_tokens``); an fp16 table is the initializer
            ``{layer}.weight``.
        ids: name of the int64 token ids, any shape.
        table: the ``(V, H)`` float table.
        fmt: fp16 (``Gather``) or a block format (``GatherBlockQuantized``).
        qp: the table's qparams for ``fmt`` (``{}`` for fp16).
    Returns:
        The name of the output tensor, ``(..., H)`` in ``b.dtype``.
    """
    if not fmt.embeddable:
        raise QuantcalError(f"{layer}: an embedding takes fp16, int8 or int4-gN, not {fmt.name}")
    return spec_of(fmt).emit_embedding(b, layer, ids, table, fmt, qp)


def emit_gather(b: GraphBuilder, layer: str, ids: str, table: torch.Tensor, fmt: FP16,
                qp: QParams) -> str:
    """fp16: ``Gather`` from the table, stored as ``{layer}.weight``."""
    init = b.initializer(f"{layer}.weight", _np(table, b.dtype))  # (V, H)
    return b.node("Gather", [init, ids], name=f"{node_prefix(layer)}/Gather")[0]


def emit_gather_block_quantized(b: GraphBuilder, layer: str, ids: str, table: torch.Tensor,
                                fmt: BlockQuant, qp: QParams) -> str:
    """A block format: ``GatherBlockQuantized`` from the packed table (its own)."""
    table = table.detach()
    packed = pack_gather_block_quantized(*_block_qparams(layer, fmt, table, qp), fmt.bits,
                                         fmt.group_size, blocks=fmt.gather_blocks(table.shape[1]))
    weight = [
        b.initializer(f"{layer}.weight_q", packed.data.numpy()),  # (V, G * blob) uint8
        b.initializer(f"{layer}.weight_scales", _np(packed.scales, b.dtype)),  # (V, G)
    ]
    if packed.zero_points is not None:  # (V, ceil(G * bits / 8)) uint8
        weight.append(b.initializer(f"{layer}.weight_zp", packed.zero_points.numpy()))
    return _gather_block_quantized(b, layer, ids, weight, fmt, packed.K, packed.width)


def gather_shared(b: GraphBuilder, layer: str, ids: str, weight: list[str],
                  packed: MatMulNBitsWeight, fmt: BlockQuant) -> str:
    """Rows ``ids`` of the table stored as a tied head's MatMulNBits initializers ``weight``
    (:func:`block_initializers`): ``B`` reshaped to ``(V, G * blob)``, scales and zero points
    as they are. Returns ``(..., H)``."""
    shape = b.const(f"{layer}.weight_q_shape", [packed.N, -1])
    (data,) = b.node("Reshape", [weight[0], shape], name=f"{node_prefix(layer)}/weight/Reshape")
    return _gather_block_quantized(b, layer, ids, [data, *weight[1:]], fmt, packed.K,
                                   packed.n_blocks * packed.block_size)


def matmul_ops(fmt: FP16) -> dict[str, int]:
    return {"MatMul": 1}


def matmulnbits_ops(fmt: BlockQuant) -> dict[str, int]:
    return {f"MatMulNBits.bits{fmt.bits}": 1}


def qdq_ops(fmt: W8A8) -> dict[str, int]:
    return {"QuantizeLinear": 1, "DequantizeLinear": 2, "MatMul": 1}


def gather_ops(fmt: FP16) -> dict[str, int]:
    return {}  # a plain Gather, not counted


def gather_block_quantized_ops(fmt: BlockQuant) -> dict[str, int]:
    return {f"GatherBlockQuantized.bits{fmt.bits}": 1}


def planned_op_counts(formats: Mapping[str, Format], embeddings: Collection[str] = (),
                      fused: Mapping[str, Sequence[str]] | None = None) -> dict[str, int]:
    """Nodes the layers of a plan emit, bias ``Add`` aside.

    Keys are ``MatMul``, ``MatMulNBits.bits4``, ``MatMulNBits.bits8``, ``QuantizeLinear``,
    ``DequantizeLinear`` and ``GatherBlockQuantized.bits4|8`` (only those that occur), as
    :func:`graph_op_counts` counts them.

    Args:
        embeddings: the names in ``formats`` that are embeddings (gathered, not multiplied).
        fused: ``{fused name: member layers}`` emitted as one node
            (:func:`quantcal.export.fusion.fusion_groups`): one node serves its members.
    """
    total: Counter[str] = Counter()
    served = {m for group in (fused or {}).values() for m in group[1:]}
    for name, fmt in formats.items():
        if name in served:
            continue  # a fused node is counted once, with its group's first member
        spec = spec_of(fmt)
        ops = spec.embedding_ops if name in embeddings else spec.linear_ops
        if ops is None:
            raise QuantcalError(f"{name}: an embedding takes fp16, int8 or int4-gN, "
                                f"not {fmt.name}")
        total.update(ops(fmt))
    return dict(total)


_COUNTED = frozenset({"MatMul", "QuantizeLinear", "DequantizeLinear"})
_BY_BITS = ("MatMulNBits", "GatherBlockQuantized")


def _op_key(node: onnx.NodeProto) -> str:
    if node.op_type in _BY_BITS:
        bits = next(a.i for a in node.attribute if a.name == "bits")
        return f"{node.op_type}.bits{bits}"
    return node.op_type


def graph_op_counts(model: onnx.ModelProto, layers: Mapping[str, object] | None = None,
                    fused: Mapping[str, Sequence[str]] | None = None) -> dict[str, int]:
    """Counts of the op types :func:`planned_op_counts` names, in ``model``, keyed alike.

    Args:
        layers: when given, count only the nodes of these layers (by name prefix), so that
            the MatMuls of attention or the head do not mix in.
        fused: with ``layers``, the fused nodes serving them (named by the group).
    """
    names = None if layers is None else [*layers, *(fused or {})]
    prefixes = None if names is None else tuple(node_prefix(n) + "/" for n in names)
    keys = [_op_key(n) for n in model.graph.node
            if prefixes is None or n.name.startswith(prefixes)]
    return dict(Counter(k for k in keys if k in _COUNTED or k.startswith(_BY_BITS)))
