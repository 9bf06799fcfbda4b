"""The decoder graph of the Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2) in ONNX.

One graph serves prefill and decode: ``input_ids`` (B, S), ``attention_mask`` (B, P+S),
``position_ids`` (B, S), ``past_key_values.{i}.key|value`` (B, kv_heads, P, head_dim) in;
``logits`` (B, S, V) and ``present.{i}.key|value`` out. It uses onnxruntime's contrib ops
where they make the CUDA provider fast: ``GroupQueryAttention`` (rotary inside, KV cache
appended in place), ``SkipSimplifiedLayerNormalization`` (residual add fused into RMSNorm).
Each linear layer and the token embedding are emitted as the plan says (``export.emit``);
node names follow module names. A head tied to the embedding is stored once with it when
``shares_tied_weight`` allows (both fp16: Transpose + MatMul of the table; the same block
format: GatherBlockQuantized reads the head's MatMulNBits initializers); otherwise each has
its own weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from onnx import TensorProto
from torch import nn

from quantcal.export.builder import MS_DOMAIN, GraphBuilder, node_prefix
from quantcal.export.emit import (
    block_initializers, emit_embedding, emit_linear, gather_shared, matmulnbits, pack_block,
)
from quantcal.fakequant import act_qparams, embedding_qparams, layer_qparams
from quantcal.formats import FP16, Format, shares_tied_weight
from quantcal.models import family_of, weight_matrix
from quantcal.packing import MatMulNBitsWeight

MAX_CACHE_POSITIONS = 131072  # rotary cos/sin rows; bounds the context the graph accepts


def _np(t: torch.Tensor, dtype) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(dtype)


def _rotary_cache(model: nn.Module, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, head_dim/2) cos and sin from the model's own rotary embedding (so rope
    scaling variants such as Llama 3's come for free)."""
    rotary = model.model.rotary_emb
    pos = torch.arange(positions).unsqueeze(0)
    dummy = torch.zeros(1, dtype=torch.float32)
    cos, sin = rotary(dummy, pos)  # (1, P, head_dim), halves duplicated
    half = cos.shape[-1] // 2
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()


@dataclass(frozen=True)
class _Shared:
    """The embedding's stored weight that a tied head multiplies by."""

    fmt: Format
    weight: list[str]  # initializer names: the fp16 table, or MatMulNBits' B, scales[, zp]
    packed: MatMulNBitsWeight | None  # None for fp16


class _Ctx:
    """What every layer's emission needs: the builder, plan formats and qparams."""

    def __init__(self, b: GraphBuilder, model: nn.Module, formats: Mapping[str, Format],
                 qparams: Mapping[str, torch.Tensor]):
        self.b, self.model, self.formats, self.qparams = b, model, formats, qparams
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
                       and shares_tied_weight(fmt, self.formats.get(family_of(self.model).lm_head),
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


def _attention(ctx: _Ctx, i: int, x: str, seqlens: str, total: str, cos: str, sin: str) -> str:
    cfg = ctx.model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    prefix = f"model.layers.{i}.self_attn"
    q, k, v = (ctx.linear(f"{prefix}.{p}", x) for p in ("q_proj", "k_proj", "v_proj"))
    out, _, _ = ctx.b.node(
        "GroupQueryAttention",
        [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total,
         cos, sin],
        [f"{node_prefix(prefix)}/GroupQueryAttention/output", f"present.{i}.key",
         f"present.{i}.value"],
        name=f"{node_prefix(prefix)}/GroupQueryAttention", domain=MS_DOMAIN,
        num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0)
    return ctx.linear(f"{prefix}.o_proj", out)


def _mlp(ctx: _Ctx, i: int, x: str) -> str:
    prefix = f"model.layers.{i}.mlp"
    gate, up = ctx.linear(f"{prefix}.gate_proj", x), ctx.linear(f"{prefix}.up_proj", x)
    p = node_prefix(prefix)
    (sig,) = ctx.b.node("Sigmoid", [gate], name=f"{p}/act_fn/Sigmoid")
    (silu,) = ctx.b.node("Mul", [gate, sig], name=f"{p}/act_fn/Mul")
    (prod,) = ctx.b.node("Mul", [silu, up], name=f"{p}/Mul")
    return ctx.linear(f"{prefix}.down_proj", prod)


def _rms_norm(ctx: _Ctx, name: str, x: str, gamma: torch.Tensor, eps: float) -> str:
    """RMSNorm(x) as SkipSimplifiedLayerNormalization with a zero skip (x * 0, on the
    device), the kernel every other norm uses. The standard-op pattern is what onnxruntime
    would fuse instead, and on CUDA in fp16 its fused SimplifiedLayerNormalization put the
    logits of a Llama-3.2-1B 13x further from fp32 than torch's own fp16 (measured)."""
    zero_scalar = ctx.b.initializer(f"{name}.zero", np.array(0, ctx.b.dtype))
    (zero,) = ctx.b.node("Mul", [x, zero_scalar], name=f"{node_prefix(name)}/zero_skip")
    normed, _ = _skip_norm(ctx, name, x, zero, gamma, eps)
    return normed


def _skip_norm(ctx: _Ctx, name: str, x: str, residual: str, gamma: torch.Tensor, eps: float
               ) -> tuple[str, str]:
    """RMSNorm(x + residual) and the sum (the new residual)."""
    p = node_prefix(name)
    normed, _, _, summed = ctx.b.node(
        "SkipSimplifiedLayerNormalization", [x, residual, ctx.weight(f"{name}.weight", gamma)],
        4, name=f"{p}/SkipLayerNorm", domain=MS_DOMAIN, epsilon=eps)
    return normed, summed


def build_llama(model: nn.Module, formats: Mapping[str, Format],
                qparams: Mapping[str, torch.Tensor], dtype) -> GraphBuilder:
    """The whole decoder as a GraphBuilder (``dtype``: activation dtype)."""
    cfg = model.config
    b = GraphBuilder(dtype)
    ctx = _Ctx(b, model, formats, qparams)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    eps = float(cfg.rms_norm_eps)
    _graph_inputs(b, cfg.num_hidden_layers, kv_heads, head_dim)
    seqlens, total = _sequence_lengths(b)
    cos_np, sin_np = _rotary_cache(model, min(cfg.max_position_embeddings, MAX_CACHE_POSITIONS))
    cos = b.initializer("cos_cache", cos_np.astype(b.dtype))
    sin = b.initializer("sin_cache", sin_np.astype(b.dtype))
    hidden = ctx.embed("model.embed_tokens", "input_ids")
    layers = model.model.layers
    x = _rms_norm(ctx, "model.layers.0.input_layernorm", hidden,
                  layers[0].input_layernorm.weight, eps)
    residual = hidden
    for i in range(cfg.num_hidden_layers):
        attn = _attention(ctx, i, x, seqlens, total, cos, sin)
        x, residual = _skip_norm(ctx, f"model.layers.{i}.post_attention_layernorm", attn,
                                 residual, layers[i].post_attention_layernorm.weight, eps)
        mlp = _mlp(ctx, i, x)
        if i + 1 < cfg.num_hidden_layers:
            x, residual = _skip_norm(ctx, f"model.layers.{i + 1}.input_layernorm", mlp,
                                     residual, layers[i + 1].input_layernorm.weight, eps)
        else:
            x, _ = _skip_norm(ctx, "model.norm", mlp, residual, model.model.norm.weight, eps)
    graph_outputs(b, ctx.linear("lm_head", x), cfg.num_hidden_layers, kv_heads, head_dim,
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
