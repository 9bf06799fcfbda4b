"""The GPT-2 decoder graph in ONNX, with the same inputs and outputs as the Llama family's.

Learned positions (``wpe`` gathered at ``position_ids``), a fused QKV projection split in
three, ``GroupQueryAttention`` without rotary (as many KV heads as heads),
``SkipLayerNormalization`` for the residual adds and the config's activation (``FastGelu``
for GPT-2's ``gelu_new``). Module paths come from the family description
(:mod:`quantcal.families`). Linear layers (``Conv1D``) are emitted as the plan says.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from quantcal.export.builder import MS_DOMAIN, ExternalData, GraphBuilder, node_prefix
from quantcal.export.decoder import _Ctx, _graph_inputs, _sequence_lengths, graph_outputs
from quantcal.export.layers import activation
from quantcal.formats import Format
from quantcal.models import held_blocks


def _skip_ln(ctx: _Ctx, name: str, x: str, residual: str, ln: nn.LayerNorm
             ) -> tuple[str, str]:
    normed, _, _, summed = ctx.b.node(
        "SkipLayerNormalization",
        [x, residual, ctx.weight(f"{name}.weight", ln.weight), ctx.weight(f"{name}.bias", ln.bias)],
        4, name=f"{node_prefix(name)}/SkipLayerNorm", domain=MS_DOMAIN, epsilon=float(ln.eps))
    return normed, summed


def _attention(ctx: _Ctx, i: int, x: str, seqlens: str, total: str) -> str:
    cfg, fam = ctx.model.config, ctx.family
    p = node_prefix(f"{fam.block(i)}.{fam.attention.path}")
    qkv = ctx.linear(fam.attn(i, fam.attention.qkv), x)
    sizes = ctx.b.const(f"{p}/split_sizes", [cfg.n_embd] * 3)
    q, k, v = ctx.b.node("Split", [qkv, sizes], 3, name=f"{p}/Split", axis=-1)
    out, _, _ = ctx.b.node(
        "GroupQueryAttention",
        [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total],
        [f"{p}/GroupQueryAttention/output", f"present.{i}.key", f"present.{i}.value"],
        name=f"{p}/GroupQueryAttention", domain=MS_DOMAIN, num_heads=cfg.n_head,
        kv_num_heads=cfg.n_head)
    return ctx.linear(fam.attn(i, fam.attention.o), out)


def _mlp(ctx: _Ctx, i: int, x: str) -> str:
    fam = ctx.family
    h = ctx.linear(fam.mlp_part(i, fam.mlp.up), x)
    g = activation(ctx, node_prefix(f"{fam.block(i)}.{fam.mlp.path}"), h)
    return ctx.linear(fam.mlp_part(i, fam.mlp.down), g)


def build_gpt2(model: nn.Module, formats: Mapping[str, Format],
               qparams: Mapping[str, torch.Tensor], dtype, *, fuse: bool = True,
               data: ExternalData | None = None) -> GraphBuilder:
    """The whole GPT-2 decoder as a GraphBuilder (``dtype``: activation dtype). ``fuse`` is
    moot: its checkpoint fuses q/k/v already (``c_attn``) and its MLP has no gate.
    ``data``: where the weights go as they come; a lazily loaded model's blocks are read
    one (and the next one's ``ln_1``) at a time."""
    cfg = model.config
    b = GraphBuilder(dtype, data)
    ctx = _Ctx(b, model, formats, qparams)
    tr = model.transformer
    head_dim = cfg.n_embd // cfg.n_head
    _graph_inputs(b, cfg.n_layer, cfg.n_head, head_dim)
    seqlens, total = _sequence_lengths(b)
    tok = ctx.embed("transformer.wte", "input_ids")
    (pos,) = b.node("Gather", [ctx.weight("transformer.wpe.weight", tr.wpe.weight),
                               "position_ids"], name="/transformer/wpe/Gather")
    (hidden,) = b.node("Add", [tok, pos], name="/transformer/embeddings/Add")
    with held_blocks(model) as hold:
        hold(0)
        ln = tr.h[0].ln_1
        (x,) = b.node("LayerNormalization", [
            hidden, ctx.weight("transformer.h.0.ln_1.weight", ln.weight),
            ctx.weight("transformer.h.0.ln_1.bias", ln.bias)],
            name="/transformer/h.0/ln_1/LayerNorm", axis=-1, epsilon=float(ln.eps))
        residual = hidden
        for i in range(cfg.n_layer):
            hold(i, i + 1)  # block i ends with block i + 1's ln_1
            attn = _attention(ctx, i, x, seqlens, total)
            x, residual = _skip_ln(ctx, f"transformer.h.{i}.ln_2", attn, residual,
                                   tr.h[i].ln_2)
            mlp = _mlp(ctx, i, x)
            nxt = (f"transformer.h.{i + 1}.ln_1", tr.h[i + 1].ln_1) if i + 1 < cfg.n_layer \
                else ("transformer.ln_f", tr.ln_f)
            x, residual = _skip_ln(ctx, nxt[0], mlp, residual, nxt[1])
    graph_outputs(b, ctx.linear("lm_head", x), cfg.n_layer, cfg.n_head, head_dim,
                  cfg.vocab_size)
    return b
