"""GPTQ as GPTQ does it: block by block, sequentially, on the quantized model's activations.

The ``--hessian`` part of the qparams step (Frantar et al.; IST-DASLab's ``llama.py
--true-sequential``, llm-compressor's sequential pipeline), over the explicit activation
cache of :mod:`quantcal.calibrate.collect`: everything but the decoder blocks goes to the
device, the first block's inputs are cached there, and for each block in order:

1. the block moves to the device (a lazily loaded model's is read from its checkpoint
   onto the device and held, :func:`quantcal.calibrate.collect.block_on_device`);
2. for each group of its layers fed one input, in execution order (attention inputs q/k/v
   or a fused qkv; the attention output; MLP inputs gate/up, gate_up or fc; the MLP
   output), the block runs over the cached inputs while one hook accumulates the group's
   Hessian ``H = X^T X / n`` (fp32, ONE per group: q/k/v share it, gate/up share it); every
   layer of the group is GPTQ-rounded (:func:`quantcal.calibrate.weights.gptq`) for every
   candidate block format (int4-gN, int8[-gN]; w8a8 and fp16 are not GPTQ's) from one
   factorisation of ``H``; ``H`` is freed, and the layers take the dequantized weights of
   their *propagation format* -- so each later group's Hessian, in this block and in every
   later one, is taken on the outputs of the layers quantized before it;
3. the block runs once more, and its outputs become the next block's cached inputs;
4. its original weights come back and it returns to the CPU (a lazily loaded model's is
   dropped, the swapped weights with it: it is read afresh when next used).

The head comes last, on the final norm of the last block's outputs.

Propagation format: per layer, the cheapest candidate block format for its shape (fewest
stored bytes, scales and zero points counted; ties: the first in ``--formats``). Under a
size budget the plan gives most layers that format, so the later layers are calibrated on
inputs close to those of the planned model; the other formats' codes are GPTQ's too, on the
same Hessians.

Peak device memory: one block and its dequantized weights, the cached activations, and one
group's Hessian with its factor; no Hessian reaches the disk. Reads the model and windows;
writes nothing; returns ``qparams.safetensors`` entries ``{layer}/{format}/{scale|zero|
codes}`` (CPU tensors) for the block formats, and leaves the model with its original weights
(blocks on the CPU, everything else on the device).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from quantcal import qmath
from quantcal.calibrate import weights
from quantcal.calibrate.collect import (
    BlockInputs, _module_device_, block_on_device, capture_block_inputs, model_dtype,
    nonfinite_hint, propagate_, use_block_,
)
from quantcal.calibrate.qparams import check_weight, keyed_qparams
from quantcal.calibrate.stats import gram
from quantcal.errors import QuantcalError
from quantcal.families import Family
from quantcal.formats import BlockQuant, Format
from quantcal.models import blocks_of, family_of, weight_matrix

DAMP = 0.01  # fraction of the mean Hessian diagonal added before inverting, as GPTQ

# called with a group's layer names and its Hessian (K, K) before it is used
HessianObserver = Callable[[tuple[str, ...], torch.Tensor], None]


@dataclass(frozen=True)
class _Job:
    formats: tuple[BlockQuant, ...]
    clip: bool  # clip-searched group ranges (weight method aware); else min/max
    act_order: bool
    on_hessian: HessianObserver | None


def gptq_formats(formats: tuple[Format, ...]) -> tuple[BlockQuant, ...]:
    """The candidates GPTQ rounds (the block formats), or a QuantcalError if none is."""
    found = tuple(f for f in formats if isinstance(f, BlockQuant))
    if not found:
        raise QuantcalError("--hessian rounds the int4/int8 formats with GPTQ, but --formats "
                            "names none; add one (e.g. int4-g128) or drop --hessian")
    return found


def propagation_format(formats: tuple[BlockQuant, ...], n: int, k: int) -> BlockQuant:
    """The format whose dequantized ``(N, K)`` weights feed the later layers: the fewest
    stored bytes (the first in ``formats`` among equals)."""
    return min(formats, key=lambda f: f.weight_bytes(n, k))


@torch.inference_mode()
def gptq_qparams(model: nn.Module, windows: torch.Tensor, modules: dict[str, nn.Module],
                 formats: tuple[Format, ...], *, batch_size: int, device: torch.device,
                 method: str = "aware", act_order: bool = False, progress: bool = True,
                 on_hessian: HessianObserver | None = None) -> dict[str, torch.Tensor]:
    """GPTQ qparams of every layer in ``modules`` for every block format in ``formats``,
    block by block on ``device`` (see the module docstring), over ``windows`` (S, L).

    Args:
        method: ``aware``: group ranges by the clip search weighted by diag(H); ``rtn``:
            min/max ranges (the paper's GPTQ).
        act_order: round columns by descending diag(H), group ranges fixed beforehand on the
            original column groups (GPTQ's static groups).
        on_hessian: sees each group's Hessian before it is used (diagnostics, tests).
    Returns:
        ``{layer}/{format}/{scale|zero|codes}`` on the CPU.
    """
    job = _Job(gptq_formats(formats), clip=method != "rtn", act_order=act_order,
               on_hessian=on_hessian)
    family = family_of(model)
    blocks = blocks_of(model, family)
    _module_device_(model, family, device)
    cache = capture_block_inputs(model, windows, batch_size=batch_size, device=device)
    dtype = model_dtype(model)
    out: dict[str, torch.Tensor] = {}
    with tqdm(total=len(blocks), desc="gptq (block by block)", unit="block",
              disable=not progress, dynamic_ncols=True) as bar:
        for i in range(len(blocks)):
            use_block_(cache, i)
            groups = layer_groups(family, i, modules)
            with block_on_device(model, i, device) as block:
                out.update(_quantize_block(block, groups, cache, job,
                                           f"in GPTQ's pass over block {i}", dtype))
            bar.update()
    out.update(_quantize_head(model, family, modules, cache, job, dtype))
    return out


def layer_groups(family: Family, i: int, modules: dict[str, nn.Module]
                 ) -> list[dict[str, nn.Module]]:
    """Block ``i``'s layers of ``modules`` as groups fed one input, in execution order."""
    att, mlp = family.attention, family.mlp
    mlp_in = ((mlp.gate_up,) if mlp.gate_up else
              (mlp.gate, mlp.up) if family.gated_mlp else (mlp.up,))
    parts = [[family.attn(i, p) for p in ((att.qkv,) if att.qkv else (att.q, att.k, att.v))],
             [family.attn(i, att.o)], [family.mlp_part(i, p) for p in mlp_in],
             [family.mlp_part(i, mlp.down)]]
    groups = [{n: modules[n] for n in names if n in modules} for names in parts]
    prefix = family.block(i) + "."
    placed = {n for g in groups for n in g}
    missed = sorted(n for n in modules if n.startswith(prefix) and n not in placed)
    if missed:
        raise QuantcalError(f"GPTQ does not know which input feeds layer {missed[0]} of the "
                            f"{family.name} block; calibrate without --hessian")
    return [g for g in groups if g]


def _quantize_block(block: nn.Module, groups: list[dict[str, nn.Module]],
                    cache: list[BlockInputs], job: _Job, where: str,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Steps 2-3 of the module docstring for one block, on the device (the caller moves or
    holds it there); its original weights are given back before it returns."""
    originals = {n: m.weight.data for g in groups for n, m in g.items()}
    out: dict[str, torch.Tensor] = {}
    try:
        for group in groups:
            out.update(_group_step(block, group, cache, job, where, dtype))
        propagate_(block, cache)
    finally:
        for group in groups:
            for name, module in group.items():
                module.weight.data = originals[name]
    return out


def _group_step(block: nn.Module, group: dict[str, nn.Module], cache: list[BlockInputs],
                job: _Job, where: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One group's Hessian, its layers' qparams, their propagation weights set in place.
    The Hessian and its factor are locals: freed when this returns."""
    first = next(iter(group))
    h = _block_hessian(block, group[first], cache)
    out, w_hats = _quantize_group(group, h, job, where, dtype, propagate=True)
    for name, w_hat in w_hats.items():
        _set_weight_(group[name], w_hat)
    return out


class _Gram:
    """Forward hook summing ``x^T x`` (K, K) fp32 of a module's input, and its tokens."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1])  # (T, K)
        g = gram(x2)
        self.sum = g if self.sum is None else self.sum.add_(g)
        self.tokens += x2.shape[0]

    def __call__(self, _module, inputs, _output) -> None:
        self.add(inputs[0])

    def mean(self) -> torch.Tensor:
        return self.sum.div_(max(self.tokens, 1))  # (K, K), in place: no second copy


def _block_hessian(block: nn.Module, module: nn.Module, cache: list[BlockInputs]
                   ) -> torch.Tensor:
    """``X^T X / n`` of ``module``'s input over the cached batches, running the block."""
    acc = _Gram()
    handle = module.register_forward_hook(acc)
    try:
        for item in cache:
            block(*item.args, **item.kwargs)
    finally:
        handle.remove()
    return acc.mean()


def _quantize_group(group: dict[str, nn.Module], h: torch.Tensor, job: _Job, where: str,
                    dtype: torch.dtype, propagate: bool
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Qparams of every layer in ``group`` for every format, from one factor of ``h``, and
    (``propagate``) each layer's dequantized weights in its propagation format."""
    names = tuple(group)
    if not bool(torch.isfinite(h).all()):
        raise QuantcalError(f"the input of layer {names[0]} holds NaN/Inf {where}; "
                            f"{nonfinite_hint(dtype)}")
    if job.on_hessian is not None:
        job.on_hessian(names, h)
    try:
        factor = weights.gptq_factor(h, DAMP, job.act_order)
    except torch.linalg.LinAlgError:
        raise QuantcalError(f"GPTQ: the Hessian of layer {names[0]} is not positive definite "
                            f"even with {DAMP:.0%} dampening; calibrate on more --samples, "
                            "or without --hessian") from None
    out: dict[str, torch.Tensor] = {}
    w_hats: dict[str, torch.Tensor] = {}
    for name, module in group.items():
        w = weight_matrix(module).detach()  # (N, K)
        check_weight(w, name)
        ref = propagation_format(job.formats, *w.shape)
        for fmt in job.formats:
            scale, zero, codes = weights.gptq(w, factor, fmt.bits, fmt.group_size,
                                              fmt.symmetric, clip=job.clip)
            if propagate and fmt == ref:
                w_hats[name] = qmath.dequantize_weight(codes, scale, zero, fmt.group_size)
            out.update(keyed_qparams(name, fmt, {"scale": scale, "zero": zero,
                                                 "codes": codes}))
    return out, w_hats


def _set_weight_(module: nn.Module, w_hat: torch.Tensor) -> None:
    """Give ``module`` the ``(N, K)`` weight ``w_hat`` in its own layout and dtype (a new
    tensor: the original stays with the caller)."""
    data = w_hat if isinstance(module, nn.Linear) else w_hat.t().contiguous()  # Conv1D: (K, N)
    module.weight.data = data.to(module.weight.dtype)


def _quantize_head(model: nn.Module, family: Family, modules: dict[str, nn.Module],
                   cache: list[BlockInputs], job: _Job, dtype: torch.dtype
                   ) -> dict[str, torch.Tensor]:
    """The layers outside the blocks (the head), on the final norm of the cached outputs."""
    rest = {n: m for n, m in modules.items() if not n.startswith(family.blocks + ".")}
    out: dict[str, torch.Tensor] = {}
    for name, module in rest.items():
        if name != family.lm_head:
            raise QuantcalError(f"GPTQ does not know which input feeds layer {name}; "
                                "calibrate without --hessian")
        norm = model.get_submodule(family.final_norm)
        acc = _Gram()
        for item in cache:
            acc.add(norm(item.args[0]))
        qparams, _ = _quantize_group({name: module}, acc.mean(), job, "after the last block",
                                     dtype, propagate=False)
        out.update(qparams)
    return out
