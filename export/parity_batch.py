"""Parity where short windows cannot see: far positions and padded batches.

Two checks of an exported decoder against the torch fake-quant model (the caller makes
``model`` that, :mod:`quantcal.export.reference`), on fixed pseudo-random tokens:

- **far positions**: both are given the same past KV cache of length P (post-rotary keys and
  values, the convention of HF's ``DynamicCache`` and of GroupQueryAttention's
  ``past``/``present``), sampled from what the model cached for the parity windows, and run
  a short window at positions ``P .. P + S``. P is chosen past
  the original rope length (``original_max_position_embeddings``: Llama 3 scaling, longrope)
  and past the sliding window, capped by the model's positions and :data:`LONG_BYTES` of
  cache, so the rope tables and window masks at far positions are compared without
  computing thousands of tokens.
- **right-padded batch**: rows of different lengths in one batch (``attention_mask`` zeros at
  the end); each row's valid logits against that row run alone.

The graph reads positions from the mask's row sums (GroupQueryAttention's ``seqlens_k``) and
ignores ``position_ids``, so it supports right padding only: left padding is not checked,
and :meth:`quantcal.runner.DecoderRunner.prefill` refuses left-padded masks.

Reads the session and model it is given; writes nothing.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from torch import nn

LONG_LEN = 16  # window run after the sampled past
LONG_MIN = 1000  # smallest past: positions past 1,000 even without a rope limit or window
LONG_BYTES = 2 << 30  # most bytes the pasts may take (keys and values, both sides)
PAD_LENGTHS = (16, 11, 5)  # rows of the right-padded batch


def _original_positions(config) -> int | None:
    """The rope's original context (Llama 3 scaling, longrope, yarn), if it has one."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    found = [getattr(config, "original_max_position_embeddings", None)]
    if isinstance(params, dict):
        for p in [params, *(v for v in params.values() if isinstance(v, dict))]:
            found.append(p.get("original_max_position_embeddings"))
    found = [int(f) for f in found if f]
    return max(found) if found else None


def _max_positions(config) -> int | None:
    return (getattr(config, "max_position_embeddings", None)
            or getattr(config, "n_positions", None))


def long_past_length(config, kv_heads: int, head_dim: int) -> tuple[int, int]:
    """``(P, wanted)``: the past length the far-position check uses, and the one it wanted
    (past the original rope length and the sliding window). ``P < wanted`` only when the
    model's positions or :data:`LONG_BYTES` do not allow more."""
    window = getattr(config, "sliding_window", None) or 0
    wanted = max(LONG_MIN, _original_positions(config) or 0, int(window)) + LONG_LEN
    layers = config.num_hidden_layers
    per_position = 2 * layers * kv_heads * head_dim * (4 + 8)  # k+v: the graph fp32, torch fp64
    limit = min(LONG_BYTES // per_position, (_max_positions(config) or wanted) - LONG_LEN)
    return max(0, min(wanted, limit)), wanted


def sampled_past(model: nn.Module, windows: torch.Tensor, length: int, seed: int = 4321
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A past of ``length`` positions, each a post-rotary ``(key, value)`` the model itself
    cached for a random token of ``windows`` ``(B, S)``: ``(1, kv_heads, P, head_dim)`` per
    layer. Gaussian keys and values would put a real model where it amplifies fp32 rounding
    past any tolerance (SmolLM2: torch's fp32 logits 0.009 from float64 after 1,016 such
    positions, 4e-5 after as many of its own)."""
    cache = model(windows, use_cache=True).past_key_values
    g = torch.Generator().manual_seed(seed)
    past = []
    for layer in cache.layers:
        keys, values = (t.transpose(0, 1).flatten(1, 2) for t in (layer.keys, layer.values))
        pick = torch.randint(0, keys.shape[1], (length,), generator=g)  # (kv, B*S, hd) rows
        past.append((keys[:, pick].unsqueeze(0), values[:, pick].unsqueeze(0)))
    return past


def _cache_keyword(model: nn.Module) -> str:
    """``cache`` (newer transformers 5.x) or ``past_key_values``: an older forward takes any
    keyword, so passing the other one would run without the past, silently."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def torch_logits_with_past(model: nn.Module, ids: torch.Tensor,
                           past: list[tuple[torch.Tensor, torch.Tensor]],
                           dtype: torch.dtype | None = None) -> np.ndarray:
    """Logits ``(1, S, V)`` of ``ids`` after ``past`` (P positions) in HF's own cache, the
    cache in ``dtype`` (default: that of the model's first parameter)."""
    from transformers import DynamicCache

    dtype = dtype or next(model.parameters()).dtype
    cache = DynamicCache(ddp_cache_data=[(k.to(dtype), v.to(dtype)) for k, v in past],
                         config=model.config)
    p, s = past[0][0].shape[2], ids.shape[1]
    out = model(ids, **{_cache_keyword(model): cache}, use_cache=True,
                attention_mask=torch.ones(1, p + s, dtype=torch.long),
                position_ids=torch.arange(p, p + s).unsqueeze(0))
    return out.logits.double().numpy()


def far_position_figures(dec, model: nn.Module, windows: torch.Tensor, tolerance,
                         dtype: torch.dtype | None = None) -> dict[str, float]:
    """The far-position check: ``long_*`` figures. ``model``: the torch reference (float64
    when affordable); ``windows`` ``(B, S)``: tokens whose cache the past is sampled from;
    ``tolerance(ref)`` gives the allowed max abs error for reference logits ``ref``;
    ``dtype``: the reference's (default: that of its first parameter), which its cache
    takes."""
    p, wanted = long_past_length(model.config, dec.kv_heads, dec.head_dim)
    if p == 0:
        return {}
    cache = {}
    for i, (k, v) in enumerate(sampled_past(model, windows, p)):
        cache[f"past_key_values.{i}.key"] = k.numpy().astype(dec.dtype)
        cache[f"past_key_values.{i}.value"] = v.numpy().astype(dec.dtype)
    # what the graph was given, exactly (an fp16 graph's past is rounded)
    past = [(torch.from_numpy(cache[f"past_key_values.{i}.key"]).double(),
             torch.from_numpy(cache[f"past_key_values.{i}.value"]).double())
            for i in range(len(cache) // 2)]
    ids = torch.randint(0, model.config.vocab_size, (1, LONG_LEN),
                        generator=torch.Generator().manual_seed(99))
    got, _ = dec.run(ids.numpy(), cache)
    ref = torch_logits_with_past(model, ids, past, dtype)
    err = float(np.abs(got - ref).max())
    return {"long_past_length": float(p), "long_past_wanted": float(wanted),
            "long_logits_max_abs": err, "long_tolerance": tolerance(ref),
            "long_passed": float(err <= tolerance(ref))}


def padded_batch_figures(dec, model: nn.Module, tolerance) -> dict[str, float]:
    """The right-padded batch check: ``padded_*`` figures (see :func:`far_position_figures`
    for ``tolerance``)."""
    seq = max(PAD_LENGTHS)
    ids = torch.randint(0, model.config.vocab_size, (len(PAD_LENGTHS), seq),
                        generator=torch.Generator().manual_seed(77))
    mask = np.zeros((len(PAD_LENGTHS), seq), np.int64)
    for row, n in enumerate(PAD_LENGTHS):
        mask[row, :n] = 1
    got, _ = dec.run(ids.numpy(), dec.empty_cache(len(PAD_LENGTHS)), mask=mask)
    err, tol = 0.0, np.inf
    for row, n in enumerate(PAD_LENGTHS):
        ref = model(ids[row:row + 1, :n], use_cache=False).logits.double().numpy()[0]
        err = max(err, float(np.abs(got[row, :n] - ref).max()))
        tol = min(tol, tolerance(ref))
    return {"padded_logits_max_abs": err, "padded_tolerance": float(tol),
            "padded_passed": float(err <= tol)}
