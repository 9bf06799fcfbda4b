"""The parts of a rotary decoder block in ONNX, each read from the family description.

Norms: RMSNorm as ``SkipSimplifiedLayerNormalization`` (the residual add fused in; a plain
norm gets a zero skip), with Gemma's ``1 + w`` folded into the weight in float32 as HF
computes it. Attention: the projections (separate; or one node, a checkpoint-fused module
or q/k/v fused by :mod:`quantcal.export.fusion`, whose packed output GroupQueryAttention
takes as it is, or split before per-head q/k RMSNorm: Qwen3, Gemma 3, reshaped to heads),
then ``GroupQueryAttention`` with rotary inside, ``local_window_size`` for a sliding window,
``softcap`` and ``scale`` where the family has them. MLP: gated (separate, or one gate/up
node split in two) with the family's activation. Node names follow module names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from onnx import TensorProto

from quantcal.export.builder import MS_DOMAIN, node_prefix
from quantcal.export.fusion import GATE_UP, QKV, split_fused
from quantcal.families import Activation, NormStyle, Sliding, activation_of
from quantcal.runner import LOGITS_FROM

if TYPE_CHECKING:
    from quantcal.export.decoder import _Ctx


def norm_weight(ctx: "_Ctx", name: str) -> tuple[torch.Tensor, float]:
    """The effective RMSNorm weight (``1 + w`` for Gemma, in float32) and its epsilon."""
    module = ctx.model.get_submodule(name)
    w = module.weight.detach().float()
    if ctx.family.norms.style is NormStyle.RMS_PLUS_ONE:
        w = 1.0 + w
    eps = getattr(module, "variance_epsilon", None)
    return w, float(eps if eps is not None else module.eps)


def rms_norm(ctx: "_Ctx", name: str, x: str) -> str:
    """RMSNorm(x) as SkipSimplifiedLayerNormalization with a zero skip (x * 0, on the
    device), the kernel every other norm uses. The standard-op pattern is what onnxruntime
    would fuse instead, and on CUDA in fp16 its fused SimplifiedLayerNormalization put the
    logits of a Llama-3.2-1B 13x further from fp32 than torch's own fp16 (measured)."""
    zero_scalar = ctx.b.initializer(f"{name}.zero", np.array(0, ctx.b.dtype))
    (zero,) = ctx.b.node("Mul", [x, zero_scalar], name=f"{node_prefix(name)}/zero_skip")
    normed, _ = skip_norm(ctx, name, x, zero)
    return normed


def skip_norm(ctx: "_Ctx", name: str, x: str, residual: str) -> tuple[str, str]:
    """RMSNorm(x + residual) and the sum (the new residual)."""
    gamma, eps = norm_weight(ctx, name)
    normed, _, _, summed = ctx.b.node(
        "SkipSimplifiedLayerNormalization", [x, residual, ctx.weight(f"{name}.weight", gamma)],
        4, name=f"{node_prefix(name)}/SkipLayerNorm", domain=MS_DOMAIN, epsilon=eps)
    return normed, summed


def head_norm(ctx: "_Ctx", name: str, x: str, head_dim: int, width: int) -> str:
    """Per-head RMSNorm of ``x`` (B, S, heads * head_dim): reshaped to (B, S * heads,
    head_dim) for the norm kernel, then back to (B, S, width)."""
    p = node_prefix(name)
    (heads,) = ctx.b.node("Reshape", [x, ctx.b.const(f"{name}.heads_shape", [0, -1, head_dim])],
                          name=f"{p}/Reshape")
    normed = rms_norm(ctx, name, heads)
    return ctx.b.node("Reshape", [normed, ctx.b.const(f"{name}.out_shape", [0, -1, width])],
                      name=f"{p}/Reshape_back")[0]


def window_of(ctx: "_Ctx", i: int) -> int | None:
    """Layer ``i``'s sliding window (HF keeps the last ``window`` keys, itself included)."""
    cfg = ctx.model.config
    window = getattr(cfg, "sliding_window", None)
    if ctx.family.sliding is Sliding.NONE or not window:
        return None
    if ctx.family.sliding is Sliding.LAYER_TYPES:
        types = getattr(cfg, "layer_types", None) or []
        return window if i < len(types) and types[i] == "sliding_attention" else None
    return window


def _attention_attrs(ctx: "_Ctx", i: int) -> dict:
    cfg, fam = ctx.model.config, ctx.family
    attrs = dict(num_heads=cfg.num_attention_heads, kv_num_heads=ctx.kv_heads, do_rotary=1,
                 rotary_interleaved=0)
    window = window_of(ctx, i)
    if window is not None:
        # onnxruntime's window, like HF's, counts the token itself: a query at t sees keys
        # t - window < j <= t (tests/export/test_families.py checks lengths around it)
        attrs["local_window_size"] = int(window)
    if fam.softcaps and getattr(cfg, "attn_logit_softcapping", None):
        attrs["softcap"] = float(cfg.attn_logit_softcapping)
    if fam.query_pre_attn_scalar:
        attrs["scale"] = float(cfg.query_pre_attn_scalar) ** -0.5
    return attrs


def _qkv(ctx: "_Ctx", i: int, x: str) -> tuple[str, str, str]:
    """q (B, S, heads * d), k and v (B, S, kv_heads * d). Where one node computes all three
    (fused, or a checkpoint-fused module) and no per-head norm must see q and k apart:
    that node's packed output (B, S, (heads + 2 * kv_heads) * d) and two empty names,
    GroupQueryAttention's packed-QKV form (its kernels split it); otherwise split here."""
    cfg, att, fam = ctx.model.config, ctx.family.attention, ctx.family
    q_width, kv_width = cfg.num_attention_heads * ctx.head_dim, ctx.kv_heads * ctx.head_dim
    name = fam.attn(i, att.qkv or QKV)
    if att.qkv is not None:
        qkv = ctx.linear(name, x)
    elif name in ctx.groups:
        qkv = ctx.fused_linear(name, x)
    else:
        return tuple(ctx.linear(fam.attn(i, p), x) for p in (att.q, att.k, att.v))  # type: ignore
    if ctx.fuse and att.q_norm is None:
        return qkv, "", ""
    return tuple(split_fused(ctx.b, name, qkv, [q_width, kv_width, kv_width]))  # type: ignore


def attention(ctx: "_Ctx", i: int, x: str, seqlens: str, total: str,
              rope: tuple[str, str]) -> str:
    """Layer ``i``'s attention output (B, S, hidden) for its normed input ``x``."""
    cfg, att, fam = ctx.model.config, ctx.family.attention, ctx.family
    q, k, v = _qkv(ctx, i, x)
    if att.q_norm is not None:
        q = head_norm(ctx, fam.attn(i, att.q_norm), q, ctx.head_dim,
                      cfg.num_attention_heads * ctx.head_dim)
        k = head_norm(ctx, fam.attn(i, att.k_norm), k, ctx.head_dim, ctx.kv_heads * ctx.head_dim)
    p = node_prefix(f"{fam.block(i)}.{att.path}")
    out, _, _ = ctx.b.node(
        "GroupQueryAttention",
        [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total,
         *rope],
        [f"{p}/GroupQueryAttention/output", f"present.{i}.key", f"present.{i}.value"],
        name=f"{p}/GroupQueryAttention", domain=MS_DOMAIN, **_attention_attrs(ctx, i))
    return ctx.linear(fam.attn(i, att.o), out)


def activation(ctx: "_Ctx", prefix: str, x: str) -> str:
    """The family's activation of ``x``, exactly as HF's ``ACT2FN`` entry computes it."""
    act, b, p = activation_of(ctx.family, ctx.model.config), ctx.b, f"{prefix}/act_fn"
    if act is Activation.SILU:
        (sig,) = b.node("Sigmoid", [x], name=f"{p}/Sigmoid")
        return b.node("Mul", [x, sig], name=f"{p}/Mul")[0]
    if act is Activation.GELU_TANH:
        return b.node("FastGelu", [x], name=f"{p}/FastGelu", domain=MS_DOMAIN)[0]
    if act is Activation.GELU:
        return b.node("Gelu", [x], name=f"{p}/Gelu", domain=MS_DOMAIN)[0]
    if act is Activation.RELU:
        return b.node("Relu", [x], name=f"{p}/Relu")[0]
    raise AssertionError(act)  # every Activation has a branch above


def mlp(ctx: "_Ctx", i: int, x: str) -> str:
    """Layer ``i``'s gated MLP: down(act(gate(x)) * up(x)); gate and up from one node
    (fused, or a checkpoint-fused module) split in two, or from their own."""
    fam, m = ctx.family, ctx.family.mlp
    name = fam.mlp_part(i, m.gate_up or GATE_UP)
    if m.gate_up is None and name not in ctx.groups:
        gate, up = ctx.linear(fam.mlp_part(i, m.gate), x), ctx.linear(fam.mlp_part(i, m.up), x)
    else:
        fused = ctx.linear(name, x) if m.gate_up is not None else ctx.fused_linear(name, x)
        width = ctx.model.config.intermediate_size
        gate, up = split_fused(ctx.b, name, fused, [width, width])
    p = node_prefix(f"{fam.block(i)}.{m.path}")
    (prod,) = ctx.b.node("Mul", [activation(ctx, p, gate), up], name=f"{p}/Mul")
    return ctx.linear(fam.mlp_part(i, m.down), prod)


def logit_rows(ctx: "_Ctx", x: str) -> str:
    """The final hidden states (B, S, H) from position ``logits_from`` on, for the head: an
    int64 (1,) graph input whose default (0) keeps every position, as evaluation needs;
    generation's prefill passes -1 and the head (the largest matrix of a small model, at
    1024 tokens by 49k-256k columns) runs for the last position only."""
    b = ctx.b
    b.input(LOGITS_FROM, TensorProto.INT64, [1])
    b.initializer(LOGITS_FROM, np.zeros(1, dtype=np.int64))
    end = b.const("/model/logits_from/end", [np.iinfo(np.int64).max])
    axis = b.const("/model/logits_from/axis", [1])
    return b.node("Slice", [x, LOGITS_FROM, end, axis], name="/model/logits_from/Slice")[0]
