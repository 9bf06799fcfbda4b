"""Per-layer sensitivity: how much quantizing one layer to one format hurts the model.

Exact score of (layer, format): the mean KL divergence (nats/token) of the next-token
distribution from the FP model's, over held-out windows, with only that layer fake-quantized
(calibrated qparams, as the export will be). It is computed block-wise: the held-out windows'
inputs of every decoder block are cached once per batch, and each (layer, formats) trial runs
only from the layer's block to the head, with all candidate formats in one batch (the
block inputs are replicated once per format and the layer applies a different quantized
weight to each replica). Everything stays on the device. A layer's sums depend on that layer
alone (:func:`kl_sums`), so under torchrun the layers are divided between the ranks and
their sums gathered (:mod:`quantcal.calibrate.shards`), with the same result bit for bit.

Fast proxy (Fisher): a second-order estimate of the same KL. With ``F_n`` the diagonal
Fisher information of the layer's output channel n (mean squared gradient of the log-
likelihood of tokens sampled from the model itself, one backward pass per held-out batch for
all layers at once) and ``E[x_k^2]`` from the calibration statistics,
``KL ~ 1/2 sum_n F_n sum_k dW_nk^2 E[x_k^2]``. It runs one forward and one backward pass per
held-out batch and is a score, not a KL. Its Spearman rank correlation with the exact scores
is reported per format, across layers (and pooled over formats, which reads higher).

No score is ever NaN/Inf: a held-out batch on which the model's own output is not finite
names the first layer whose input is not (or the logits), and a score that comes out
non-finite names its layer and format, each as a QuantcalError.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from quantcal.calibrate import distributed
from quantcal.calibrate.collect import BlockInputs, capture_block_inputs, check_finite_inputs
from quantcal.calibrate.stats import LayerStats, new_stats, stat_hooks
from quantcal.errors import QuantcalError
from quantcal.fakequant import act_qparams, fake_quant_module, layer_qparams, quantized_weight
from quantcal.formats import Format
from quantcal.models import blocks_of, family_of


class _PerFormat(nn.Module):
    """Applies the f-th of F modules to the f-th of F equal chunks of the batch."""

    def __init__(self, variants: list[nn.Module]):
        super().__init__()
        self.variants = nn.ModuleList(variants)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = x.chunk(len(self.variants), dim=0)
        return torch.cat([m(c) for m, c in zip(self.variants, chunks)], dim=0)


def _replicate(value: Any, batch: int, copies: int, memo: dict | None = None) -> Any:
    """Repeat every tensor whose leading (batch) dimension is ``batch`` ``copies`` times
    (each tensor once: blocks that share a mask share its copy through ``memo``)."""
    memo = {} if memo is None else memo
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] == batch:
            if id(value) not in memo:
                memo[id(value)] = value.repeat(copies, *([1] * (value.dim() - 1)))
            return memo[id(value)]
        return value
    if isinstance(value, tuple):
        return tuple(_replicate(v, batch, copies, memo) for v in value)
    if isinstance(value, list):
        return [_replicate(v, batch, copies, memo) for v in value]
    if isinstance(value, dict):
        return {k: _replicate(v, batch, copies, memo) for k, v in value.items()}
    return value


def head_logits(model: nn.Module, head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``head(hidden)`` as the model's forward makes its logits: with Gemma 2's final
    soft-capping, ``cap * tanh(logits / cap)``, where the config sets one."""
    logits = head(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap and family_of(model).softcaps:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _run_blocks(blocks, start: int, item: BlockInputs) -> torch.Tensor:
    """Hidden states after blocks ``start..end`` from ``item`` (block ``start``'s inputs;
    each block with its own keyword arguments where the model gives them)."""
    args, hidden = item.args, item.args[0]
    for j, block in enumerate(list(blocks)[start:], start):
        kwargs = item.per_block[j] if item.per_block else item.kwargs
        hidden = _hidden(block(hidden, *args[1:], **kwargs))
    return hidden


def _kl_per_replica(logits: torch.Tensor, ref_logp: torch.Tensor, copies: int) -> torch.Tensor:
    """Mean KL(P_ref || P_q) per replica: ``logits`` (F*B, T, V), ``ref_logp`` (B, T, V)."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    logq = logq.view(copies, *ref_logp.shape)  # (F, B, T, V)
    kl = (ref_logp.exp() * (ref_logp - logq)).sum(-1)  # (F, B, T)
    return kl.flatten(1).mean(1)  # (F,)


def _dtype_hint(model: nn.Module) -> str:
    dtype = next(model.parameters()).dtype
    if dtype in (torch.float16, torch.bfloat16):
        return f"the model runs in {str(dtype).removeprefix('torch.')}: try --dtype float32"
    return "check the checkpoint"


def _nonfinite_output_error(model: nn.Module, batch: torch.Tensor, names, where: str
                            ) -> QuantcalError:
    """Why the model's output on ``batch`` (B, T) is not finite: the first of ``names``
    whose input is not, found by one more forward with statistic hooks (a rare path)."""
    modules = {n: model.get_submodule(n) for n in names}
    stats = new_stats(modules, batch.device, hessian=False)
    try:
        with torch.inference_mode(), stat_hooks(modules, stats):
            model(input_ids=batch, use_cache=False)
        check_finite_inputs(stats, modules, where, next(model.parameters()).dtype)
    except QuantcalError as exc:
        return exc
    return QuantcalError(f"the model's logits are not finite (NaN/Inf) {where} although every "
                         f"layer's input is; {_dtype_hint(model)}")


def _finite_scores(scores: dict[str, dict[str, float]], what: str, model: nn.Module | None
                   ) -> dict[str, dict[str, float]]:
    """``scores``, or a QuantcalError naming the first (layer, format) that is NaN/Inf."""
    for layer, by_format in scores.items():
        for fmt, value in by_format.items():
            if not math.isfinite(value):
                hint = _dtype_hint(model) if model is not None else "check the checkpoint"
                raise QuantcalError(
                    f"the {what} of layer {layer} as {fmt} came out {value}: with that layer "
                    f"in {fmt} the model's output is not finite; {hint}, or drop {fmt} "
                    "from --formats")
    return scores


def _block_inputs_all(model: nn.Module, batch: torch.Tensor, device: torch.device
                      ) -> tuple[list[BlockInputs], torch.Tensor]:
    """Inputs of every block for one batch, and the final hidden states (head input)."""
    family = family_of(model)
    blocks = blocks_of(model, family)
    (first,) = capture_block_inputs(model, batch, batch_size=batch.shape[0], device=device)
    kw = first.per_block or [first.kwargs] * len(blocks)  # block i's own masks and rotary
    per_block = [first]
    hidden = first.args[0]
    for i, block in enumerate(blocks):
        hidden = _hidden(block(hidden, *first.args[1:], **kw[i]))
        if i + 1 < len(blocks):
            per_block.append(BlockInputs((hidden,) + tuple(first.args[1:]), kw[i + 1],
                                         first.per_block))
    return per_block, hidden


def exact_sensitivity(model: nn.Module, held_out: torch.Tensor, layers: Mapping[str, Any],
                      formats: tuple[Format, ...], qparams: Mapping[str, torch.Tensor], *,
                      batch_size: int, device: torch.device, progress: bool = True
                      ) -> dict[str, dict[str, float]]:
    """``scores[layer][format]``: mean KL with only ``layer`` quantized to ``format``; under
    torchrun (:func:`quantcal.calibrate.distributed.current`) spread over the ranks.

    Args:
        held_out: ``(S, L)`` token windows not used for calibration.
        layers: layer name -> LayerInfo (``block`` index, None for the head).
    """
    blocks = {n: info.block for n, info in layers.items()}
    world = distributed.current()
    if world is None:
        sums = kl_sums(model, held_out, blocks, formats, qparams, batch_size=batch_size,
                       device=device, progress=progress)
    else:
        from quantcal.calibrate.shards import lead_exact

        sums = lead_exact(world, model, held_out, blocks, formats, qparams,
                          batch_size=batch_size, device=device, progress=progress)
    total = held_out.shape[0]
    scores = {n: {f.name: float(v) / total for f, v in zip(formats, sums[n].cpu())}
              for n in layers}
    return _finite_scores(scores, "sensitivity (KL)", model)


@torch.inference_mode()
def kl_sums(model: nn.Module, held_out: torch.Tensor, blocks: Mapping[str, int | None],
            formats: tuple[Format, ...], qparams: Mapping[str, torch.Tensor], *,
            batch_size: int, device: torch.device, progress: bool = True
            ) -> dict[str, torch.Tensor]:
    """Per layer of ``blocks`` (name -> block index, None for the head), ``(F,)`` float32:
    the sum over held-out windows of the mean KL per window, one entry per format (in
    ``formats`` order). A layer's sums depend on nothing but that layer, so any subset of
    the layers may be scored alone (one rank's share)."""
    family = family_of(model)
    model_blocks = blocks_of(model, family)
    norm = model.get_submodule(family.final_norm)
    copies = len(formats)
    sums = {n: torch.zeros(copies, device=device) for n in blocks}
    if not blocks:
        return sums
    batches = held_out.split(batch_size)

    def candidates(name: str) -> _PerFormat:
        """One layer's quantized copies, one per format: built when the layer is scored and
        freed after, so memory holds one layer's candidates, not the model's times the
        formats (rebuilding them per held-out batch gives the same weights)."""
        return _PerFormat([fake_quant_module(model.get_submodule(name), f,
                                             layer_qparams(qparams, name, f),
                                             act_qparams(qparams, name)) for f in formats])

    bar = tqdm(total=len(batches) * len(blocks), desc="sensitivity", unit="layer",
               disable=not progress, dynamic_ncols=True)
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        per_block, final = _block_inputs_all(model, batch, device)
        ref_logp = torch.log_softmax(head_logits(model, model.get_submodule(family.lm_head),
                                                 norm(final)).float(), dim=-1)  # (B, T, V)
        if not bool(torch.isfinite(ref_logp).all()):  # once per batch
            raise _nonfinite_output_error(model, batch, blocks,
                                          f"on held-out batch {i + 1} of {len(batches)}")
        b = batch.shape[0]
        memo: dict = {}
        kw_rep = [_replicate(k, b, copies, memo) for k in per_block[0].per_block]
        replicated = [BlockInputs(_replicate(i.args, b, copies, memo),
                                  _replicate(i.kwargs, b, copies, memo), kw_rep)
                      for i in per_block]
        final_rep = _replicate(final, b, copies)
        for name, block in blocks.items():
            logits = _trial_logits(model, name, candidates, block, model_blocks, norm,
                                   replicated, final_rep)
            sums[name] += _kl_per_replica(logits, ref_logp, copies) * b
            bar.update(1)
    bar.close()
    return sums


def _trial_logits(model: nn.Module, name: str, candidates, block: int | None, model_blocks,
                  norm: nn.Module, replicated: list[BlockInputs], final_rep) -> torch.Tensor:
    """Logits ``(F*B, T, V)`` with layer ``name`` swapped for its per-format candidates, run
    from its block (or, for the head, from the final hidden states)."""
    module = model.get_submodule(name)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, candidates(name))
    try:
        head = model.get_submodule(family_of(model).lm_head)  # swapped when it is the layer
        if block is None:
            return head_logits(model, head, norm(final_rep))
        return head_logits(model, head, norm(_run_blocks(model_blocks, block,
                                                         replicated[block])))
    finally:
        setattr(parent, attr, module)


def output_fisher(model: nn.Module, held_out: torch.Tensor, names, *, batch_size: int,
                  device: torch.device, progress: bool = True) -> dict[str, torch.Tensor]:
    """Per layer, ``(N,)`` mean over tokens of the squared gradient of ``log p(y)`` with
    respect to the layer's output, ``y`` sampled from the model's own distribution; a
    progress bar counts the held-out windows (one forward and backward pass per batch)."""
    sums = {n: None for n in names}
    handles = []

    def hook(name):
        def fn(_m, _grad_in, grad_out):
            g = grad_out[0].detach().float()
            sq = g.reshape(-1, g.shape[-1]).square().sum(0)  # (N,)
            sums[name] = sq if sums[name] is None else sums[name] + sq
        return fn

    embed = model.get_input_embeddings()
    gen = torch.Generator(device=device).manual_seed(0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trainable:  # gradients reach the activations only: no weight gradients
            p.requires_grad_(False)
        for n in names:
            handles.append(model.get_submodule(n).register_full_backward_hook(hook(n)))
        batches = held_out.split(batch_size)
        bar = tqdm(total=held_out.shape[0], desc="sensitivity (Fisher)", unit="window",
                   disable=not progress, dynamic_ncols=True)
        for i, batch in enumerate(batches):
            with torch.enable_grad():
                emb = embed(batch.to(device)).detach().requires_grad_(True)
                logits = model(inputs_embeds=emb, use_cache=False).logits.float()
                if not bool(torch.isfinite(logits).all()):  # once per batch
                    raise _nonfinite_output_error(
                        model, batch.to(device), names,
                        f"on held-out batch {i + 1} of {len(batches)}")
                logp = torch.log_softmax(logits, dim=-1)
                y = torch.multinomial(logp.detach().exp().flatten(0, 1), 1, generator=gen)
                logp.flatten(0, 1).gather(1, y).sum().backward()
            bar.update(batch.shape[0])
        bar.close()
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
    tokens = held_out.numel()
    return {n: (v / tokens) for n, v in sums.items() if v is not None}


def proxy_sensitivity(weights: Mapping[str, torch.Tensor], stats: Mapping[str, LayerStats],
                      formats: tuple[Format, ...], qparams: Mapping[str, torch.Tensor],
                      fisher: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """``scores[layer][format]``: ``1/2 sum_n F_n sum_k dW_nk^2 E[x_k^2]`` (nats/token)."""
    out: dict[str, dict[str, float]] = {}
    for name, w in weights.items():
        w = w.float()
        h = stats[name].mean_sq.to(w.device)  # (K,)
        f = fisher[name].to(w.device)  # (N,)
        out[name] = {}
        for fmt in formats:
            d = w - quantized_weight(fmt, w, layer_qparams(qparams, name, fmt))  # (N, K)
            out[name][fmt.name] = 0.5 * float((f * (d.square() @ h)).sum())
    return _finite_scores(out, "fast sensitivity (Fisher proxy)", None)


def spearman(a: Mapping[str, Mapping[str, float]], b: Mapping[str, Mapping[str, float]]
             ) -> float:
    """Spearman rank correlation over all (layer, format) pairs present in both (pooled:
    that coarser formats hurt more ranks right by itself, so it reads high)."""
    from scipy.stats import spearmanr

    keys = [(n, f) for n in a for f in a[n] if n in b and f in b[n]]
    rho = spearmanr([a[n][f] for n, f in keys], [b[n][f] for n, f in keys]).statistic
    return float(rho)


def spearman_per_format(a: Mapping[str, Mapping[str, float]],
                        b: Mapping[str, Mapping[str, float]]) -> dict[str, float | None]:
    """Per format, the Spearman rank correlation across layers of ``a`` and ``b`` (how well
    one ranks the layers the planner chooses between); None where fewer than three layers
    or a constant score leave it undefined."""
    from scipy.stats import spearmanr

    formats = dict.fromkeys(f for n in a for f in a[n])
    out: dict[str, float | None] = {}
    for f in formats:
        names = [n for n in a if f in a[n] and n in b and f in b[n]]
        x, y = [a[n][f] for n in names], [b[n][f] for n in names]
        if len(names) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
            out[f] = None
            continue
        rho = float(spearmanr(x, y).statistic)
        out[f] = rho if math.isfinite(rho) else None
    return out
