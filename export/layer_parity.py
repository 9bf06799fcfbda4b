"""Per-layer parity: which planned layer an export gets wrong.

For every planned layer (linear layers, the head and the token embedding), the input it sees
in the torch fake-quant model (:mod:`quantcal.export.reference`, a block at a time) is
captured with a forward hook on one window; the layer's
emitted ONNX op(s) are then built alone into a one-node graph (``export.emit`` with the same
qparams, exactly as the decoder emits them) and run in onnxruntime on that input, and their
output is compared with the fake-quant module's. Layers the export fuses into one node
(:mod:`quantcal.export.fusion`) are checked through that node: it runs once on their shared
input, and each layer's slice of its output is compared with that layer's module, so the
figures still name the layer. They name the layer that disagrees most, so that a failed
whole-model check says where to look. The layers are built block by block, each block's
weights held only while its layers are (a model loaded with ``low_memory`` reads it then).

Reads the model, plan formats and qparams it is given; writes nothing.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto
from torch import nn

from quantcal.export.builder import GraphBuilder
from quantcal.export.emit import (
    block_initializers, emit_embedding, emit_linear, gather_shared, pack_block,
)
from quantcal.export.fusion import emit_fused, split_fused, widths
from quantcal.export.reference import fake_quant_reference
from quantcal.fakequant import act_qparams, embedding_qparams, layer_qparams
from quantcal.formats import FP16, Format, shares_tied_weight
from quantcal.models import block_index, family_of, held_blocks, weight_matrix

LAYER_KEY = "layer_max_abs/"  # + layer name: that layer's max abs error against torch
WORST_KEY = "worst_layer/"  # + layer name: the worst layer's error relative to its output
TINY = 1e-30


def capture_io(model: nn.Module, formats: Mapping[str, Format],
               qparams: Mapping[str, torch.Tensor], ids: torch.Tensor
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Input and output of every planned layer in the fake-quant model on ``ids`` ``(B, S)``.

    Returns:
        ``{layer: (x, y)}``: ``x`` ``(B, S, K)`` (token ids ``(B, S)`` for an embedding),
        ``y`` ``(B, S, N)``, float32 on the CPU.
    """
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def save(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        captured[name] = (x.detach().cpu(), y.detach().float().cpu())

    with fake_quant_reference(model, formats, qparams, observe=save), torch.inference_mode():
        model(ids, use_cache=False)
    return captured


def _tied_shared(model: nn.Module, name: str, formats: Mapping[str, Format]) -> bool:
    """Whether the decoder stores embedding ``name`` once with its tied head."""
    module = model.get_submodule(name)
    head = model.get_output_embeddings()
    return (head is not None and head.weight is module.weight and head.bias is None
            and shares_tied_weight(formats[name], formats.get(family_of(model).lm_head),
                                   module.embedding_dim))


def _embedding_graph(b: GraphBuilder, model: nn.Module, name: str,
                     formats: Mapping[str, Format], qparams: Mapping[str, torch.Tensor]
                     ) -> str:
    """The embedding's rows as the decoder emits them: ``Gather``, ``GatherBlockQuantized``
    of its own table, or of its tied head's MatMulNBits weight."""
    fmt = formats[name]
    table = model.get_submodule(name).weight.detach()  # (V, H)
    ids = b.input("x", TensorProto.INT64, ["B", "S"])
    if isinstance(fmt, FP16):
        return emit_embedding(b, name, ids, table, fmt, {})
    qp = embedding_qparams(model, name, formats, qparams)
    if not _tied_shared(model, name, formats):
        return emit_embedding(b, name, ids, table, fmt, qp)
    packed = pack_block(name, fmt, table, qp)
    return gather_shared(b, name, ids, block_initializers(b, name, packed), packed, fmt)


def layer_graph(model: nn.Module, name: str, formats: Mapping[str, Format],
                qparams: Mapping[str, torch.Tensor], dtype, k: int) -> bytes:
    """A graph ``x -> y`` of layer ``name`` alone, emitted as the decoder emits it.

    Args:
        k: the layer's input width (unused for an embedding, whose input is token ids).
    """
    b = GraphBuilder(dtype)
    module = model.get_submodule(name)
    if isinstance(module, nn.Embedding):
        y = _embedding_graph(b, model, name, formats, qparams)
    else:
        fmt = formats[name]
        x = b.input("x", b.elem_type, ["B", "S", k])
        qp = {} if isinstance(fmt, FP16) else layer_qparams(qparams, name, fmt)
        y = emit_linear(b, name, x, weight_matrix(module).detach(), module.bias, fmt, qp,
                        act_qparams(qparams, name))
    b.output(y, b.elem_type, ["B", "S", "N"])
    return b.model().SerializeToString()


def fused_graph(model: nn.Module, name: str, members: Sequence[str],
                formats: Mapping[str, Format], qparams: Mapping[str, torch.Tensor], dtype,
                k: int) -> bytes:
    """A graph ``x -> (y of each member)`` of group ``name``'s one node as the decoder emits
    it (:func:`quantcal.export.fusion.emit_fused`), split into its members' outputs."""
    b = GraphBuilder(dtype)
    x = b.input("x", b.elem_type, ["B", "S", k])
    y = emit_fused(b, model, name, members, formats, qparams, x)
    for out in split_fused(b, name, y, widths(model, members)):
        b.output(out, b.elem_type, ["B", "S", "N"])
    return b.model().SerializeToString()


def _providers(provider: str) -> list[str]:
    if provider == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider"]
    return ["CPUExecutionProvider"]


def _run(graph: bytes, x: torch.Tensor, dtype, provider: str) -> list[np.ndarray]:
    sess = ort.InferenceSession(graph, providers=_providers(provider))
    feed = x.numpy() if x.dtype == torch.int64 else x.float().numpy().astype(dtype)
    return [y.astype(np.float32) for y in sess.run(None, {"x": feed})]


def _error(got: np.ndarray, ref: torch.Tensor) -> tuple[float, float]:
    return float(np.abs(got - ref.numpy()).max()), float(ref.abs().max())


def layer_errors(model: nn.Module, formats: Mapping[str, Format],
                 qparams: Mapping[str, torch.Tensor], ids: torch.Tensor, *, dtype,
                 provider: str, fused: Mapping[str, Sequence[str]] | None = None
                 ) -> dict[str, tuple[float, float]]:
    """``{layer: (max abs error, max |torch output|)}`` of every planned layer's emitted
    op(s) against its fake-quant module, on the inputs one window ``ids`` ``(B, S)`` gives
    it. ``dtype``: the graph's activation dtype. ``fused``: ``{fused name: members}`` the
    export emits as one node; that node runs once on the members' (shared) input and each
    member's slice of its output is compared with that member's module."""
    captured = capture_io(model, formats, qparams, ids)
    groups = fused or {}
    group_of = {m: name for name, members in groups.items() for m in members}
    out: dict[str, tuple[float, float]] = {}
    through_fused: dict[str, tuple[float, float]] = {}
    with held_blocks(model) as hold:
        for name, (x, y) in captured.items():  # in forward order, so block by block
            block = block_index(model, name)
            hold(*(() if block is None else (block,)))
            group = group_of.get(name)
            if group is not None and name not in through_fused:
                members = groups[group]
                gx = captured[members[0]][0]
                graph = fused_graph(model, group, members, formats, qparams, dtype,
                                    gx.shape[-1])
                for member, got in zip(members, _run(graph, gx, dtype, provider)):
                    through_fused[member] = _error(got, captured[member][1])
            if group is not None:
                out[name] = through_fused[name]
            else:
                graph = layer_graph(model, name, formats, qparams, dtype, x.shape[-1])
                out[name] = _error(_run(graph, x, dtype, provider)[0], y)
    return out


def layer_figures(errors: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """Parity figures of :func:`layer_errors`: each layer's max abs error
    (``layer_max_abs/<layer>``), and the worst layer (largest error relative to its output's
    scale) as ``worst_layer_max_abs``, ``worst_layer_rel`` and ``worst_layer/<layer>``."""
    if not errors:
        return {}
    rel = {n: err / max(ref, TINY) for n, (err, ref) in errors.items()}
    worst = max(rel, key=lambda n: (not np.isfinite(rel[n]), rel[n]))
    return {"worst_layer_max_abs": errors[worst][0], "worst_layer_rel": rel[worst],
            f"{WORST_KEY}{worst}": rel[worst],
            **{f"{LAYER_KEY}{n}": err for n, (err, _) in errors.items()}}


def worst_layer(figures: Mapping[str, float | None]) -> tuple[str, float | None] | None:
    """``(layer, max abs error)`` of the worst layer recorded in ``figures``, if any."""
    for key in figures:
        if key.startswith(WORST_KEY):
            name = key[len(WORST_KEY):]
            return name, figures.get(f"{LAYER_KEY}{name}")
    return None
