"""Fused projections: the layers of a rotary block that read one input, emitted as one node.

A block's q, k and v projections read the same normed input, and so do its MLP's gate and
up projections. :func:`fusion_groups` names the layers the decoder emits as one node: q/k/v
(and gate/up) of a block that share one format (one :class:`Format` value: the same bits,
group size and symmetry; fp16, int8 or int4) and all have a bias or none has. ``w8a8``
layers stay apart (each quantizes its input with its own static activation scale), and so
does any group whose members a mixed plan gives different formats.

:func:`emit_fused` emits a group as one node whose weight is the row-wise concatenation of
the members' weights as each alone would be emitted: for MatMulNBits the members' packed
codes, scales and zero points (:func:`concat_packed`; the op quantizes each output row in
blocks along K, so the rows of the concatenation are the members' own rows), for fp16 the
weights, and the biases alike. Its output is the members' outputs side by side, in the
group's order; :func:`split_fused` splits it. On CPU in fp32 the fused node's outputs are
bit-identical to the separate nodes' (tests/export/test_fusion.py).

A group is named after the node it becomes, ``{block}.{attention}.qkv_proj`` and
``{block}.{mlp}.gate_up_proj``: the names of Phi-3's checkpoint-fused modules and of
onnxruntime-genai's fused nodes. A family whose checkpoint fuses them already (Phi-3's
``qkv_proj``/``gate_up_proj``, GPT-2's ``c_attn``) has no group: its module is one layer.
Reads the model, plan formats and qparams it is given; writes nothing but the builder.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from quantcal.export import emit
from quantcal.export.builder import GraphBuilder, node_prefix
from quantcal.fakequant import layer_qparams
from quantcal.families import Graph
from quantcal.formats import BlockQuant, Format
from quantcal.formatspec import specs
from quantcal.models import family_of, weight_matrix
from quantcal.packing import MatMulNBitsWeight

# load the format registry now: a format missing a piece stops the export at import
specs()
QKV, GATE_UP = "qkv_proj", "gate_up_proj"
ALL_KINDS = (QKV, GATE_UP)
# What ``fuse=True`` fuses. q/k/v only: GroupQueryAttention takes the packed q/k/v as it is,
# while a fused gate/up needs a Split, which on an H100 (onnxruntime 1.31) costs about what
# the one node saves at M = 1 (2.7 us against 1-4 us per block) and far more in prefill
# (37 us per block of the 1B shape at 1024 tokens): opt in with ``ALL_KINDS`` / --fuse-mlp.
DEFAULT_KINDS = (QKV,)


def _candidates(model: nn.Module, kinds: Sequence[str] = ALL_KINDS
                ) -> Iterator[tuple[str, tuple[str, ...]]]:
    """Every (fused name, member layers) of ``kinds`` a rotary model could fuse."""
    fam = family_of(model)
    if fam.graph is not Graph.ROTARY:
        return
    att, mlp = fam.attention, fam.mlp
    for i in range(model.config.num_hidden_layers):
        if att.qkv is None and QKV in kinds:
            yield fam.attn(i, QKV), tuple(fam.attn(i, p) for p in (att.q, att.k, att.v))
        if fam.gated_mlp and mlp.gate_up is None and GATE_UP in kinds:
            yield fam.mlp_part(i, GATE_UP), (fam.mlp_part(i, mlp.gate),
                                             fam.mlp_part(i, mlp.up))


def fuse_kinds(fuse: bool | Sequence[str]) -> tuple[str, ...]:
    """The kinds of group a ``fuse`` argument asks for: True the default, False none."""
    if fuse is True:
        return DEFAULT_KINDS
    kinds = tuple(fuse or ())
    unknown = set(kinds) - set(ALL_KINDS)
    if unknown:
        raise ValueError(f"unknown fusion kinds {sorted(unknown)}; use {ALL_KINDS}")
    return kinds


def _fusable(model: nn.Module, formats: Mapping[str, Format], members: Sequence[str]) -> bool:
    fmts = {formats.get(n) for n in members}
    fmt = next(iter(fmts))
    if len(fmts) != 1 or fmt is None or not fmt.fusable:
        return False
    return len({model.get_submodule(n).bias is None for n in members}) == 1


def fusion_groups(model: nn.Module, formats: Mapping[str, Format],
                  fuse: bool | Sequence[str] = True) -> dict[str, tuple[str, ...]]:
    """``{fused name: member layers}`` of the layers ``model`` emits as one node under
    ``formats`` (empty for a family with nothing to fuse); ``fuse``: see :func:`fuse_kinds`."""
    return {name: members for name, members in _candidates(model, fuse_kinds(fuse))
            if _fusable(model, formats, members)}


def concat_packed(parts: Sequence[MatMulNBitsWeight]) -> MatMulNBitsWeight:
    """The MatMulNBits weight whose output rows are ``parts``' rows, one after another
    (the parts share K, bits, block size and symmetry)."""
    first = parts[0]
    zero_points = None if first.zero_points is None else torch.cat(
        [p.zero_points for p in parts])  # type: ignore[misc]
    return MatMulNBitsWeight(
        B=torch.cat([p.B for p in parts]),  # (sum N, G, blob)
        scales=torch.cat([p.scales for p in parts]),  # (sum N, G)
        zero_points=zero_points, K=first.K, N=sum(p.N for p in parts), bits=first.bits,
        block_size=first.block_size)


def emit_fused(b: GraphBuilder, model: nn.Module, name: str, members: Sequence[str],
               formats: Mapping[str, Format], qparams: Mapping[str, torch.Tensor],
               x: str) -> str:
    """Append the one node of group ``name`` (and its bias ``Add``) reading ``x``.

    Args:
        members: the group's layers, in output order; one format among them (FP16 or a
            block format), each packed as :func:`quantcal.export.emit.emit_linear` would.
    Returns:
        The output ``(..., sum of the members' N)`` in ``b.dtype``.
    """
    fmt = formats[members[0]]
    modules = [model.get_submodule(n) for n in members]
    weights = [weight_matrix(m).detach() for m in modules]  # (N_i, K) each
    bias = None if modules[0].bias is None else torch.cat([m.bias.detach() for m in modules])
    if not isinstance(fmt, BlockQuant):
        return emit.emit_linear(b, name, x, torch.cat(weights), bias, fmt, {})
    packed = concat_packed([emit.pack_block(n, fmt, w, layer_qparams(qparams, n, fmt))
                            for n, w in zip(members, weights)])
    y = emit.matmulnbits(b, name, x, emit.block_initializers(b, name, packed), packed)
    return emit.add_bias(b, name, y, bias)


def split_fused(b: GraphBuilder, name: str, y: str, widths: Sequence[int]) -> list[str]:
    """The members' outputs of the fused (or checkpoint-fused) layer ``name``'s output ``y``,
    ``widths`` wide each, split on the last axis."""
    sizes = b.const(f"{name}.split_sizes", list(widths))
    return b.node("Split", [y, sizes], len(widths), name=f"{node_prefix(name)}/Split", axis=-1)


def widths(model: nn.Module, members: Sequence[str]) -> list[int]:
    """Output widths of ``members``."""
    return [weight_matrix(model.get_submodule(n)).shape[0] for n in members]
