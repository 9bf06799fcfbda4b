"""Rotary cos/sin caches for GroupQueryAttention, computed by the model's own rotary module.

HF's rotary embedding is called on ``arange(P)`` positions, so every rope variant it
implements (linear, Llama 3's ``llama3``, yarn; Gemma 3's local and global bases, one per
layer type) comes out exactly as HF computes it, attention scaling included. ``longrope``
(Phi-3/3.5/4) switches for the whole sequence between short and long factors when the
sequence grows past ``original_max_position_embeddings`` (HF: ``max(position_ids) + 1 >
original``); the graph does the same with an ``If`` on ``total_sequence_length``, as
onnxruntime-genai's builder does, choosing between two caches. Writes initializers
``cos_cache``/``sin_cache`` (one row per position: :mod:`quantcal.export.positions` reads
the limit from it) and, where needed, ``*_local`` and ``*_short`` variants.
"""

from __future__ import annotations

import numpy as np
import torch
from onnx import helper
from torch import nn

from quantcal.export.builder import GraphBuilder
from quantcal.families import Family

MAX_CACHE_POSITIONS = 131072  # rotary cos/sin rows; bounds the context the graph accepts


def _rows(model: nn.Module, positions: int, layer_type: str | None
          ) -> tuple[np.ndarray, np.ndarray]:
    """(positions, rotary_dim/2) cos and sin from HF's rotary module."""
    rotary = model.model.rotary_emb
    pos = torch.arange(positions).unsqueeze(0)
    dummy = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        args = (dummy, pos) if layer_type is None else (dummy, pos, layer_type)
        cos, sin = rotary(*args)  # (1, P, rotary_dim), halves duplicated
    half = cos.shape[-1] // 2
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()


def _rope_params(model: nn.Module, layer_type: str | None) -> dict:
    params = getattr(model.config, "rope_parameters", None) or {}
    return params.get(layer_type, {}) if layer_type is not None else params


def positions_of(model: nn.Module) -> int:
    return min(int(model.config.max_position_embeddings), MAX_CACHE_POSITIONS)


def _switched(b: GraphBuilder, suffix: str, long: tuple[str, str], short: tuple[str, str],
              total: str, original: int) -> tuple[str, str]:
    """``long`` caches when total_sequence_length > ``original``, else ``short``."""
    limit = b.const(f"/model/rotary{suffix}/original_max", np.array(original, np.int32),
                    np.int32)
    (cond,) = b.node("Greater", [total, limit], name=f"/model/rotary{suffix}/Greater")

    def branch(pair: tuple[str, str], tag: str):
        outs = [f"/model/rotary{suffix}/{tag}/{n}" for n in ("cos", "sin")]
        nodes = [helper.make_node("Identity", [src], [out], name=f"{out}/Identity")
                 for src, out in zip(pair, outs)]
        return helper.make_graph(nodes, f"rotary{suffix}_{tag}", [], [
            helper.make_tensor_value_info(o, b.elem_type, None) for o in outs])

    return tuple(b.node("If", [cond], [f"cos{suffix}", f"sin{suffix}"],
                        name=f"/model/rotary{suffix}/If", then_branch=branch(long, "long"),
                        else_branch=branch(short, "short")))  # type: ignore[return-value]


def _caches(b: GraphBuilder, model: nn.Module, layer_type: str | None, suffix: str,
            total: str) -> tuple[str, str]:
    positions = positions_of(model)
    params = _rope_params(model, layer_type)
    original = params.get("original_max_position_embeddings")
    cos, sin = _rows(model, positions, layer_type)
    names = (b.initializer(f"cos_cache{suffix}", cos.astype(b.dtype)),
             b.initializer(f"sin_cache{suffix}", sin.astype(b.dtype)))
    if params.get("rope_type") != "longrope" or positions <= int(original):
        return names
    # the rows above hold the long factors (HF chose them for P > original positions)
    cos_s, sin_s = _rows(model, int(original), layer_type)
    short = (b.initializer(f"cos_cache{suffix}_short", cos_s.astype(b.dtype)),
             b.initializer(f"sin_cache{suffix}_short", sin_s.astype(b.dtype)))
    return _switched(b, suffix, names, short, total, int(original))


def rotary_caches(b: GraphBuilder, model: nn.Module, family: Family, total: str
                  ) -> list[tuple[str, str]]:
    """Per decoder layer, the (cos, sin) cache names its GroupQueryAttention reads."""
    cfg = model.config
    if not family.rope_per_layer_type:
        one = _caches(b, model, None, "", total)
        return [one] * cfg.num_hidden_layers
    made: dict[str, tuple[str, str]] = {}
    for layer_type in sorted(set(cfg.layer_types)):  # full_attention gets cos_cache
        suffix = "" if layer_type == "full_attention" else "_local"
        made[layer_type] = _caches(b, model, layer_type, suffix, total)
    return [made[t] for t in cfg.layer_types[:cfg.num_hidden_layers]]
