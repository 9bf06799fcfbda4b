"""Activation-aware weight scaling (AWQ, Lin et al.; llm-awq's ``auto_scale``,
llm-compressor's ``AWQModifier``), folded into the model so the exported graph gains no op.

A *scale group* is one place where a per-input-channel scale ``s`` (K,) moves exactly: the op
before some linears has its output divided by ``s``, the linears' input columns are multiplied
by it. Per decoder block, from the family description (:mod:`quantcal.families`):

- attention input norm -> q, k, v (a fused qkv); the search compares the attention's output
- v (the v rows of a fused qkv) -> o, only when kv heads == heads (as AWQ: with GQA one v
  channel feeds several o columns)
- MLP input norm -> gate, up (a fused gate_up; GPT-2's fc); compared on the MLP's output
- up (the up half of a fused gate_up) -> down, only for a gated MLP, act(gate) * up

A norm absorbs ``1/s`` in its own convention: RMSNorm ``w / s``; Gemma's ``x * (1 + w)`` as
``w <- (1 + w) / s - 1``; LayerNorm (GPT-2) weight and bias ``/ s``; a linear in its output
rows and bias. Each fold is exact in real arithmetic. Every family quantcal supports is
handled; a norm style without a fold is refused (:func:`supported_family`).

Search, per group as AWQ: for ``alpha`` on a grid in [0, 1), ``s = mean|x|^alpha /
(mean|w~|^(1 - alpha) + 1e-4)`` (``w~``: weights relative to their group's abs-max, averaged
over rows), normalised by ``sqrt(max s * min s)``; the group's weights become
``Q(W diag(s)) diag(s)^-1`` (round to nearest in the target format) and the compared module
runs on the cached calibration inputs; the smallest mean squared output error wins. ``s = 1``
competes too, so the search never does worse than plain RTN on its own objective.

Persisted in ``qparams.safetensors`` as ``{layer}/awq/scale`` ((K,) float32) for every linear
whose input columns were multiplied (q, k, v hold one copy each). :func:`apply_awq_` folds
them into a freshly loaded model in calibrate's order, so export sees calibrate's weights.
On a lazily loaded model (``--sequential``) each block is searched and folded while held, and
:func:`fold_awq_` folds its scales again whenever it is read afterwards.
Math functions are pure; those ending in ``_`` change a model in place; :func:`awq_step_` is
calibrate's glue (a checkpointed step).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from quantcal import qmath
from quantcal.calibrate.collect import (
    BlockInputs, _module_device_, block_arguments, block_on_device,
)
from quantcal.errors import QuantcalError
from quantcal.families import Family, NormStyle
from quantcal.formats import BlockQuant, Format
from quantcal.lazymodel import on_each_block_, store_of
from quantcal.models import block_index, blocks_of, family_of, is_quantizable, weight_matrix
from quantcal.rundir import load_tensors, save_tensors

N_GRID = 20  # alphas 0, 0.05, ..., 0.95 (AWQ's grid)
EPS = 1e-4  # AWQ's floor on a scale and on the weight term
SCALE_KEY = "awq/scale"  # qparams.safetensors key suffix: {layer}/awq/scale
STEP_FILE, STEP_KIND = "awq.safetensors", "awq"  # calibrate's resume checkpoint


def alpha_grid(n: int = N_GRID) -> list[float]:
    """The alphas AWQ tries: ``0, 1/n, ..., (n-1)/n``."""
    return [i / n for i in range(n)]


def weight_mean(weights: list[torch.Tensor], group_size: int | None) -> torch.Tensor:
    """``(K,)`` mean over output rows of |w| relative to its group's abs-max, over the
    ``(N_i, K)`` weights of a group stacked (llm-compressor's ``w_mean``)."""
    w = torch.cat([x.float() for x in weights])  # (N, K)
    k = w.shape[1]
    wg = qmath.group_view(w.abs(), group_size or k)  # (N, G, g)
    rel = wg / (wg.amax(-1, keepdim=True) + 1e-6)
    return qmath.ungroup(rel, k).mean(0)


def candidate_scale(x_mean: torch.Tensor, w_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(K,)`` float32 scale for one alpha, normalised so that ``max * min == 1``."""
    s = (x_mean.float().pow(alpha) / (w_mean.float().pow(1 - alpha) + EPS)).clamp(min=EPS)
    return s / (s.max() * s.min()).sqrt()


def scaled_rtn(w: torch.Tensor, s: torch.Tensor, fmt: BlockQuant) -> torch.Tensor:
    """``Q(W diag(s)) diag(s)^-1``, ``(N, K)`` float32: what the layer computes once ``s`` is
    folded and the scaled weight rounded to nearest in ``fmt``."""
    s = s.float().to(w.device)
    q = qmath.rtn_weight(w.float() * s, fmt.bits, fmt.group_size, fmt.symmetric)
    return q / s


@dataclass(frozen=True)
class Searched:
    """A group's search: the scale chosen, its alpha (None: ``s = 1`` won) and every loss."""

    scale: torch.Tensor  # (K,) float32
    alpha: float | None
    losses: dict[float | None, float] = field(default_factory=dict)


def search_scale(x_mean: torch.Tensor, w_mean: torch.Tensor,
                 loss: Callable[[torch.Tensor], float], grid: int = N_GRID) -> Searched:
    """The candidate of smallest ``loss(s)``: ``s = 1`` first (it wins ties), then each alpha
    of :func:`alpha_grid`. A non-finite loss never wins; if none is finite, ``s = 1``."""
    ones = torch.ones(x_mean.shape, dtype=torch.float32, device=x_mean.device)
    candidates: dict[float | None, torch.Tensor] = {None: ones}
    for alpha in alpha_grid(grid):
        candidates[alpha] = candidate_scale(x_mean, w_mean, alpha)
    losses = {a: loss(s) for a, s in candidates.items()}
    finite = {a: v for a, v in losses.items() if math.isfinite(v)}
    best = min(finite, key=finite.__getitem__) if finite else None
    return Searched(candidates[best], best, losses)


def search_linear(w: torch.Tensor, x: torch.Tensor, fmt: BlockQuant, grid: int = N_GRID
                  ) -> Searched:
    """AWQ's search for one ``(N, K)`` linear on its inputs ``x`` (T, K): the error is the
    mean squared difference of ``x W^T`` and ``x W_hat^T``."""
    x = x.reshape(-1, x.shape[-1]).float()
    ref = x @ w.float().T  # (T, N)

    def loss(s: torch.Tensor) -> float:
        return float((x @ scaled_rtn(w, s, fmt).T - ref).square().mean())
    return search_scale(x.abs().mean(0), weight_mean([w], fmt.group_size), loss, grid)


@dataclass(frozen=True)
class ScaleGroup:
    """One fold site (module paths from the causal LM). ``prev`` is a norm, or a linear whose
    last K output rows (the v slice of a fused qkv, the up half of a fused gate_up) are
    divided by ``s``; ``layers`` get their input columns multiplied; ``inspect`` is the
    module whose output the search compares (AWQ's ``module2inspect``)."""

    prev: str
    layers: tuple[str, ...]
    inspect: str


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 or wider (a float64 model folds in float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _fold_layer_norm(norm: nn.Module, s: torch.Tensor) -> None:
    norm.weight.copy_(_wide(norm.weight) / s)
    if norm.bias is not None:
        norm.bias.copy_(_wide(norm.bias) / s)


NORM_FOLDS: dict[NormStyle, Callable[[nn.Module, torch.Tensor], object]] = {
    NormStyle.RMS: lambda norm, s: norm.weight.copy_(_wide(norm.weight) / s),
    NormStyle.RMS_PLUS_ONE: lambda norm, s: norm.weight.copy_((1 + _wide(norm.weight)) / s - 1),
    NormStyle.LAYER: _fold_layer_norm,
}


def supported_family(model: nn.Module) -> Family:
    """The model's family, or a QuantcalError if its norms have no exact fold here."""
    family = family_of(model)
    if family.norms.style not in NORM_FOLDS:
        raise QuantcalError(f"--awq: the {family.name} family's {family.norms.style.value} "
                            "norms have no exact fold for AWQ scales; calibrate without --awq")
    return family


def scale_groups(model: nn.Module, block: int) -> list[ScaleGroup]:
    """The fold sites of decoder block ``block``, in the order they are searched and folded."""
    family = supported_family(model)
    a, m, norms = family.attention, family.mlp, family.norms
    base = family.block(block)
    attn = [family.attn(block, p) for p in ((a.qkv,) if a.qkv else (a.q, a.k, a.v))]
    groups = [ScaleGroup(family.norm(block, norms.attn_in), tuple(attn), f"{base}.{a.path}")]
    heads = model.config.num_attention_heads
    if (getattr(model.config, "num_key_value_heads", None) or heads) == heads:
        o = family.attn(block, a.o)
        groups.append(ScaleGroup(family.attn(block, a.qkv or a.v), (o,), o))
    ups = (m.gate_up,) if m.gate_up else (m.gate, m.up) if family.gated_mlp else (m.up,)
    groups.append(ScaleGroup(family.norm(block, norms.mlp_in),
                             tuple(family.mlp_part(block, p) for p in ups), f"{base}.{m.path}"))
    if family.gated_mlp:
        down = family.mlp_part(block, m.down)
        groups.append(ScaleGroup(family.mlp_part(block, m.gate_up or m.up), (down,), down))
    return groups


@torch.no_grad()
def fold_(model: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Fold ``s`` (K,) into the model: ``prev``'s output ``/ s``, ``layers``' columns ``* s``."""
    family = supported_family(model)
    prev = model.get_submodule(group.prev)
    s = s.detach().float()
    if is_quantizable(prev):
        w = weight_matrix(prev)  # (N, K_in) view; the last K rows feed the group
        k = s.numel()
        w[-k:].copy_(_wide(w[-k:]) / s.to(w.device)[:, None])
        if getattr(prev, "bias", None) is not None:
            prev.bias[-k:].copy_(_wide(prev.bias[-k:]) / s.to(prev.bias.device))
    else:
        if getattr(prev, "weight", None) is None:
            raise QuantcalError(f"--awq: the norm {group.prev} has no weight to fold scales "
                                "into; calibrate without --awq")
        NORM_FOLDS[family.norms.style](prev, s.to(prev.weight.device))
    for name in group.layers:
        w = weight_matrix(model.get_submodule(name))  # (N, K)
        w.copy_(_wide(w) * s.to(w.device))


def apply_awq_(model: nn.Module, qparams: dict[str, torch.Tensor]) -> int:
    """Fold the ``{layer}/awq/scale`` tensors of a run's qparams into ``model`` as calibrate
    did (block by block, group by group); returns the number of groups folded (0: the run
    was calibrated without ``--awq``)."""
    names = {k[:-len(SCALE_KEY) - 1] for k in qparams if k.endswith("/" + SCALE_KEY)}
    if not names:
        return 0
    folded: list[ScaleGroup] = []
    for i in range(len(blocks_of(model, supported_family(model)))):
        for group in scale_groups(model, i):
            if group.layers[0] not in names:
                continue
            s = qparams[f"{group.layers[0]}/{SCALE_KEY}"]
            for name in group.layers:
                other = qparams.get(f"{name}/{SCALE_KEY}")
                if other is None or not torch.equal(other, s):
                    raise QuantcalError(f"qparams.safetensors: the AWQ scales of {name} and "
                                        f"{group.layers[0]} differ; re-run `quantcal "
                                        "calibrate --awq`")
            fold_(model, group, s)
            folded.append(group)
    left = names - {n for g in folded for n in g.layers}
    if left:
        raise QuantcalError(f"qparams.safetensors holds AWQ scales for {sorted(left)[0]}, "
                            "which this model cannot fold; was it calibrated on another "
                            "model? re-run `quantcal calibrate --awq`")
    return len(folded)


def fold_awq_(model: nn.Module, scales: Mapping[str, torch.Tensor], now: bool = True
              ) -> None:
    """Fold the ``{layer}/awq/scale`` tensors of ``scales`` into ``model`` as
    :func:`apply_awq_` does, for a model loaded either way: a lazily loaded model's blocks
    take theirs each time they are read (:func:`quantcal.lazymodel.on_each_block_`: the
    same fold of the same checkpoint weights, so the same bits every time). ``now=False``:
    only from the next read on (the blocks' scales were folded while they were held; a
    model loaded whole is left as it is)."""
    per_block: dict[int | None, dict[str, torch.Tensor]] = defaultdict(dict)
    for key in scales:
        if key.endswith("/" + SCALE_KEY):
            per_block[block_index(model, key[:-len(SCALE_KEY) - 1])][key] = scales[key]
    outside = per_block.pop(None, {})
    if now:
        apply_awq_(model, outside)  # scales outside the blocks are refused
    if now or store_of(model) is not None:
        on_each_block_(model, lambda i: apply_awq_(model, per_block.get(i, {})))


def target_format(formats: tuple[Format, ...]) -> BlockQuant:
    """The format the scales are searched for: the coarsest weight-only one among
    ``formats`` (fewest bits, then largest group), where rounding hurts most."""
    blocks = [f for f in formats if isinstance(f, BlockQuant)]
    if not blocks:
        raise QuantcalError("--awq searches scales for a weight-only format; add int4-gN or "
                            "int8 to --formats")
    return min(blocks, key=lambda f: (f.bits, -f.group_size))


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class _Seen:
    calls: list[BlockInputs] = field(default_factory=list)  # a module's calls, per batch
    outputs: list[torch.Tensor] = field(default_factory=list)  # and its outputs


def _run_recording(model: nn.Module, block: nn.Module, groups: list[ScaleGroup],
                   hidden: list[torch.Tensor], calls: list[BlockInputs]
                   ) -> tuple[dict[str, _Seen], list[torch.Tensor]]:
    """Run ``block`` on each batch, recording the calls of each group's first layer and
    inspected module (and the latter's outputs); returns them and the block's outputs."""
    names = {g.layers[0] for g in groups} | {g.inspect for g in groups}
    inspected = {g.inspect for g in groups}
    seen = {n: _Seen() for n in names}
    handles = []
    for name in names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(
            lambda _m, a, kw, n=name: seen[n].calls.append(BlockInputs(a, kw)),
            with_kwargs=True))
        if name in inspected:
            handles.append(module.register_forward_hook(
                lambda _m, a, kw, out, n=name: seen[n].outputs.append(_first(out)),
                with_kwargs=True))
    try:
        nxt = [_first(block(h, *c.args[1:], **c.kwargs)) for h, c in zip(hidden, calls)]
    finally:
        for h in handles:
            h.remove()
    return seen, nxt


def _search_group(model: nn.Module, group: ScaleGroup, fmt: BlockQuant,
                  seen: dict[str, _Seen], grid: int) -> Searched:
    """AWQ's search for one group on the recorded calls; the weights are left as found."""
    layers = [model.get_submodule(n) for n in group.layers]
    originals = [weight_matrix(m).detach().clone() for m in layers]  # (N_i, K) each
    xs = [c.args[0] for c in seen[group.layers[0]].calls]  # (B, L, K) each: linears' input
    k = xs[0].shape[-1]
    x_mean = sum(x.reshape(-1, k).float().abs().sum(0) for x in xs) / sum(
        x.numel() // k for x in xs)  # (K,)
    inspect, target = model.get_submodule(group.inspect), seen[group.inspect]
    count = sum(r.numel() for r in target.outputs)

    def loss(s: torch.Tensor) -> float:
        for module, w in zip(layers, originals):
            weight_matrix(module).copy_(scaled_rtn(w, s, fmt))
        err = 0.0
        for call, ref in zip(target.calls, target.outputs):
            out = _first(inspect(*call.args, **call.kwargs))
            err += float((out.float() - ref.float()).square().sum())
        return err / count
    try:
        return search_scale(x_mean, weight_mean(originals, fmt.group_size), loss, grid)
    finally:
        for module, w in zip(layers, originals):
            weight_matrix(module).copy_(w)


@torch.inference_mode()
def search_awq_(model: nn.Module, windows: torch.Tensor, fmt: BlockQuant, *, batch_size: int,
                device: torch.device, grid: int = N_GRID, progress: bool = True
                ) -> dict[str, torch.Tensor]:
    """Search every group's scale on calibration ``windows`` (S, L), one decoder block on
    ``device`` at a time, and fold it in; returns ``{layer}/awq/scale`` (CPU float32).

    A model wholly on ``device`` stays there; otherwise (``--sequential``) everything but the
    blocks moves there and each block visits it in turn. Each block runs once on the cached
    inputs (recording its groups' inputs and outputs, giving the next block's inputs), then
    each group is searched and folded; the fold leaves the FP outputs unchanged.
    """
    from tqdm.auto import tqdm

    family = supported_family(model)
    blocks = blocks_of(model, family)
    if any(p.device.type != device.type for p in model.parameters()):
        _module_device_(model, family, device)
    calls = block_arguments(model, windows, batch_size=batch_size, device=device)
    hidden = [c.args[0] for c in calls[0]]  # (B, L, H) each
    out: dict[str, torch.Tensor] = {}
    for i in tqdm(range(len(blocks)), desc="awq", unit="block", disable=not progress):
        home = next(blocks[i].parameters()).device
        with block_on_device(model, i, device, home) as block:
            groups = scale_groups(model, i)
            seen, hidden = _run_recording(model, block, groups, hidden, calls[i])
            for group in groups:
                found = _search_group(model, group, fmt, seen, grid)
                fold_(model, group, found.scale)
                out.update({f"{n}/{SCALE_KEY}": found.scale.cpu().clone()
                            for n in group.layers})
            del seen
    if store_of(model) is not None:  # each block's folds went with it: made again on read
        fold_awq_(model, out, now=False)
    return out


def awq_step_(ckpt, model: nn.Module, windows: torch.Tensor, config, device: torch.device,
              progress: bool) -> dict[str, torch.Tensor]:
    """Calibrate's AWQ step (``ckpt``: its checkpoint): search and fold, the scales kept in
    the staging folder for a resumed run, which folds them again instead of searching.
    Returns the ``{layer}/awq/scale`` tensors for ``qparams.safetensors``."""
    path = ckpt.stage.file(STEP_FILE)
    if ckpt.done(STEP_KIND):
        scales, _ = load_tensors(path, STEP_KIND)
        fold_awq_(model, scales)
        return scales
    t = time.perf_counter()
    fmt = target_format(config.formats)
    scales = search_awq_(model, windows, fmt, batch_size=config.batch_size, device=device,
                         progress=progress)
    save_tensors(path, scales, kind=STEP_KIND, metadata={"format": fmt.name})
    ckpt.mark(STEP_KIND, {"awq_s": time.perf_counter() - t})
    return scales
