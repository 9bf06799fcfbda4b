"""The rotary decoder graph in ONNX: every family whose description (:mod:`quantcal.families`)
says ``Graph.ROTARY`` (Llama 2/3.x, SmolLM2, Mistral, Qwen2/2.5/3, Phi-3/3.5/4, Gemma 2/3).

One graph serves prefill and decode: ``input_ids`` (B, S), ``attention_mask`` (B, P+S),
``position_ids`` (B, S), ``past_key_values.{i}.key|value`` (B, kv_heads, P, head_dim) in;
``logits`` (B, S, V) and ``present.{i}.key|value`` out. It uses onnxruntime's contrib ops
where they make the CUDA provider fast: ``GroupQueryAttention`` (rotary inside, KV cache
appended in place), ``SkipSimplifiedLayerNormalization`` (residual add fused into RMSNorm).
The block's parts (norms and where they sit, attention extras, activation, fused
projections) come from :mod:`quantcal.export.layers`, the rotary caches from
:mod:`quantcal.export.rope`. Each linear layer and the token embedding are emitted as the
plan says (``export.emit``), q/k/v and gate/up of one format as one node each
(``export.fusion``); node names follow module names. A head tied to the embedding is
stored once with it when ``shares_tied_weight`` allows (both fp16: Transpose + MatMul of
the table; the same block format: GatherBlockQuantized reads the head's MatMulNBits
initializers); otherwise each has its own weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from onnx import TensorProto
from torch import nn

from quantcal.export.builder import ExternalData, GraphBuilder, node_prefix
from quantcal.export.emit import (
    block_initializers, emit_embedding, emit_linear, gather_shared, matmulnbits, pack_block,
)
from quantcal.export.fusion import emit_fused, fusion_groups
from quantcal.fakequant import act_qparams, embedding_qparams, layer_qparams
from quantcal.export.layers import attention, logit_rows, mlp, rms_norm, skip_norm
from quantcal.export.rope import MAX_CACHE_POSITIONS, rotary_caches
from quantcal.formats import FP16, Format, shares_tied_weight
from quantcal.models import family_of, held_blocks, weight_matrix
from quantcal.packing import MatMulNBitsWeight

__all__ = ["MAX_CACHE_POSITIONS", "build_llama", "graph_outputs"]

def _np(t: torch.Tensor, dtype) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(dtype)


@dataclass(frozen=True)
class _Shared:
    """The embedding's stored weight that a tied head multiplies by."""

    fmt: Format
    weight: list[str]  # initializer names: the fp16 table, or MatMulNBits' B, scales[, zp]
    packed: MatMulNBitsWeight | None  # None for fp16


class _Ctx:
    """What every layer's emission needs: the builder, plan formats and qparams, and the
    groups of layers emitted as one node (none when ``fuse`` is off)."""

    def __init__(self, b: GraphBuilder, model: nn.Module, formats: Mapping[str, Format],
                 qparams: Mapping[str, torch.Tensor], fuse: bool = True):
        self.b, self.model, self.formats, self.qparams = b, model, formats, qparams
        self.family = family_of(model)
        self.fuse = fuse
        self.groups = fusion_groups(model, formats, fuse)
        cfg = model.config
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        self.shared: _Shared | None = None  # what a tied head reuses of the embedding

    def embed(self, name: str, ids: str) -> str:
        """The token embedding's rows for ``ids``, ``(B, S, H)``, in its planned format;
        stored so that a tied head reuses it when ``shares_tied_weight`` says so."""
        module = self.model.get_submodule(name)
        fmt = self.formats.get(name, FP16())
        qp = {} if isinstance(fmt, FP16) else embedding_qparams(
            self.model, name, self.formats, self.qparams)
        head = self.model.get_output_embeddings()
        stored_once = (head is not None and head.weight is module.weight and head.bias is None
                       and shares_tied_weight(fmt, self.formats.get(self.family.lm_head),
                                              module.embedding_dim))
        if stored_once and isinstance(fmt, FP16):
            return self._tied_fp16_rows(name, ids, module.weight)
        if not stored_once:
            return emit_embedding(self.b, name, ids, module.weight, fmt, qp)
        packed = pack_block(name, fmt, module.weight.detach(), qp)
        self.shared = _Shared(fmt, block_initializers(self.b, name, packed), packed)
        return gather_shared(self.b, name, ids, self.shared.weight, packed, fmt)

    def _tied_fp16_rows(self, name: str, ids: str, table: torch.Tensor) -> str:
        """A tied fp16 table is stored once, transposed to (H, V): the head's MatMul reads
        it as it is, and the embedding gathers columns (``Gather`` on axis 1, then a
        transpose of just those rows), as onnxruntime-genai does. Stored as (V, H), the head
        would have to transpose the whole table at every step."""
        p = node_prefix(name)
        transposed = _np(table.detach().T.contiguous(), self.b.dtype)  # (H, V)
        init = self.b.initializer(f"{name}.weight", transposed)
        self.shared = _Shared(FP16(), [init], None)
        (cols,) = self.b.node("Gather", [init, ids], name=f"{p}/Gather", axis=1)  # (H, B, S)
        return self.b.node("Transpose", [cols], name=f"{p}/Transpose", perm=[1, 2, 0])[0]

    def linear(self, name: str, x: str) -> str:
        module = self.model.get_submodule(name)
        fmt = self.formats[name]
        shared = self.shared
        if (shared is not None and shared.fmt == fmt
                and module is self.model.get_output_embeddings()):
            if shared.packed is not None:  # the head's own MatMulNBits weight, stored once
                return matmulnbits(self.b, name, x, shared.weight, shared.packed)
            # the (H, V) table is the head's MatMul weight as it is
            return self.b.node("MatMul", [x, *shared.weight], name=f"{node_prefix(name)}/MatMul")[0]
        return emit_linear(self.b, name, x, weight_matrix(module).detach(), module.bias, fmt,
                           layer_qparams(self.qparams, name, fmt),
                           act_qparams(self.qparams, name))

    def fused_linear(self, name: str, x: str) -> str:
        """Group ``name``'s one node on ``x`` (its members' outputs side by side)."""
        members = self.groups[name]
        self.b.fused[name] = list(members)
        return emit_fused(self.b, self.model, name, members, self.formats, self.qparams, x)

    def weight(self, name: str, tensor: torch.Tensor) -> str:
        return self.b.initializer(name, _np(tensor, self.b.dtype))


def _graph_inputs(b: GraphBuilder, layers: int, kv_heads: int, head_dim: int) -> None:
    b.input("input_ids", TensorProto.INT64, ["batch", "seq"])
    b.input("attention_mask", TensorProto.INT64, ["batch", "total_seq"])
    b.input("position_ids", TensorProto.INT64, ["batch", "seq"])
    for i in range(layers):
        for kind in ("key", "value"):
            b.input(f"past_key_values.{i}.{kind}", b.elem_type,
                    ["batch", kv_heads, "past_seq", head_dim])


def _sequence_lengths(b: GraphBuilder) -> tuple[str, str]:
    """``seqlens_k`` (B,) int32 = tokens per row - 1 (from the mask's row sums, on the
    device), and ``total_sequence_length``: an int32 scalar graph input (P + S) that the
    runner feeds from host memory, where GroupQueryAttention reads it. Computing it in the
    graph needs a ``Shape`` subgraph, which onnxruntime keeps on the CPU and a session with
    CPU fallback disabled refuses."""
    one = b.const("/model/attn_mask/one", [1])
    (summed,) = b.node("ReduceSum", ["attention_mask", one], name="/model/attn_mask/ReduceSum",
                       keepdims=0)
    (summed32,) = b.node("Cast", [summed], name="/model/attn_mask/Cast", to=TensorProto.INT32)
    (seqlens,) = b.node("Sub", [summed32, b.const("/model/attn_mask/one_s", 1, np.int32)],
                        name="/model/attn_mask/seqlens_k")
    total = b.input("total_sequence_length", TensorProto.INT32, [])
    return seqlens, total


def _embed(ctx: _Ctx) -> str:
    """Token rows (B, S, H), times the embedding's own ``embed_scale`` where the family
    scales them (Gemma: sqrt(hidden) in the model dtype, as HF multiplies)."""
    name = ctx.family.embedding
    hidden = ctx.embed(name, "input_ids")
    if not ctx.family.scaled_embedding:
        return hidden
    module = ctx.model.get_submodule(name)
    scale = module.embed_scale.to(module.weight.dtype).float().item()
    const = ctx.b.initializer(f"{name}.embed_scale", np.array(scale, ctx.b.dtype))
    return ctx.b.node("Mul", [hidden, const], name=f"{node_prefix(name)}/Mul")[0]


def _final_softcap(ctx: _Ctx, logits: str) -> str:
    """Gemma's final logit soft-capping: cap * tanh(logits / cap)."""
    cap = getattr(ctx.model.config, "final_logit_softcapping", None)
    if not (ctx.family.softcaps and cap):
        return logits
    c = ctx.b.initializer("lm_head.softcap", np.array(cap, ctx.b.dtype))
    (scaled,) = ctx.b.node("Div", [logits, c], name="/lm_head/softcap/Div")
    (tanh,) = ctx.b.node("Tanh", [scaled], name="/lm_head/softcap/Tanh")
    return ctx.b.node("Mul", [tanh, c], name="/lm_head/softcap/Mul")[0]


def _block(ctx: _Ctx, i: int, x: str, residual: str, seqlens: str, total: str,
           rope: tuple[str, str]) -> tuple[str, str]:
    """Layer ``i`` from its normed input ``x``; returns the next layer's normed input (the
    final norm's after the last layer) and the residual stream."""
    fam, norms, layers = ctx.family, ctx.family.norms, ctx.model.config.num_hidden_layers
    attn = attention(ctx, i, x, seqlens, total, rope)
    if norms.attn_out is not None:
        attn = rms_norm(ctx, fam.norm(i, norms.attn_out), attn)
    x, residual = skip_norm(ctx, fam.norm(i, norms.mlp_in), attn, residual)
    out = mlp(ctx, i, x)
    if norms.mlp_out is not None:
        out = rms_norm(ctx, fam.norm(i, norms.mlp_out), out)
    nxt = fam.norm(i + 1, norms.attn_in) if i + 1 < layers else fam.final_norm
    return skip_norm(ctx, nxt, out, residual)


def build_llama(model: nn.Module, formats: Mapping[str, Format],
                qparams: Mapping[str, torch.Tensor], dtype, *, fuse: bool = True,
                data: ExternalData | None = None) -> GraphBuilder:
    """The whole rotary decoder as a GraphBuilder (``dtype``: activation dtype; ``fuse``:
    q/k/v and gate/up of one format as one node each, :mod:`quantcal.export.fusion`, and
    a packed q/k/v fed to GroupQueryAttention as it is). ``b.fused`` names what was fused.
    ``data``: where the weights go as they come; a lazily loaded model's blocks are read
    one (and the next one's input norm) at a time."""
    cfg = model.config
    b = GraphBuilder(dtype, data)
    ctx = _Ctx(b, model, formats, qparams, fuse)
    fam = ctx.family
    _graph_inputs(b, cfg.num_hidden_layers, ctx.kv_heads, ctx.head_dim)
    seqlens, total = _sequence_lengths(b)
    ropes = rotary_caches(b, model, fam, total)
    residual = _embed(ctx)
    with held_blocks(model) as hold:
        hold(0)
        x = rms_norm(ctx, fam.norm(0, fam.norms.attn_in), residual)
        for i in range(cfg.num_hidden_layers):
            hold(i, i + 1)  # block i ends with block i + 1's input norm
            x, residual = _block(ctx, i, x, residual, seqlens, total, ropes[i])
    logits = _final_softcap(ctx, ctx.linear(fam.lm_head, logit_rows(ctx, x)))
    graph_outputs(b, logits, cfg.num_hidden_layers, ctx.kv_heads, ctx.head_dim,
                  cfg.vocab_size)
    return b


def graph_outputs(b: GraphBuilder, logits: str, layers: int, kv_heads: int, head_dim: int,
                  vocab: int) -> None:
    """Declare ``logits`` and the ``present.*`` cache outputs (the decoder contract)."""
    b.node("Identity", [logits], ["logits"], name="/lm_head/output")
    b.output("logits", b.elem_type, ["batch", "seq", vocab])
    for i in range(layers):
        for kind in ("key", "value"):
            b.output(f"present.{i}.{kind}", b.elem_type,
                     ["batch", kv_heads, "total_seq", head_dim])
