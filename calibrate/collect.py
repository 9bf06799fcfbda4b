"""Running calibration windows through the model with statistic hooks.

Two drivers with the same result:

- :func:`collect_full`: the whole model on the device, one forward per batch.
- :func:`collect_sequential`: one decoder block on the device at a time. An explicit
  activation cache holds each batch's block inputs (hidden states plus the keyword arguments
  the model passes every block: masks, rotary embeddings, positions); each block is moved to
  the device, calibrated on the cached inputs, its outputs become the next block's inputs,
  and it moves back. Peak device memory is one block plus the cached activations. On a
  model loaded lazily (``load_model(low_memory=True)``) the block is instead read from the
  memory-mapped checkpoint straight onto the device and dropped after
  (:func:`block_on_device`), so host RAM too holds one block at a time.

The activation cache's pieces (:func:`capture_block_inputs`, :func:`use_block_`,
:func:`_module_device_`, :func:`block_on_device`, :func:`propagate_`) also drive GPTQ's
block-by-block pass (:mod:`quantcal.calibrate.gptq`) and AWQ's (:mod:`.awq`).

Both report progress with tqdm (tokens/s) and remove their hooks on any exit. Both stop at
the first non-finite activation: after each batch (full) or block (sequential) the running
statistics are checked once, and a NaN/Inf ends the run with a QuantcalError naming the
first layer whose input held it.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from quantcal.calibrate.stats import LayerStats, first_nonfinite_input, new_stats, stat_hooks
from quantcal.errors import QuantcalError
from quantcal.lazymodel import store_of
from quantcal.models import block_weights, blocks_of, family_of, to_device_

log = logging.getLogger(__name__)


def _batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(windows.split(batch_size))  # each (B, L)


def check_finite_inputs(stats: dict[str, LayerStats], names: Iterable[str], where: str,
                        dtype: torch.dtype) -> None:
    """Raise a QuantcalError naming the first of ``names`` whose input statistics saw a
    NaN/Inf; ``where`` says when (e.g. ``in batch 3 of 16``). One host synchronisation."""
    found = first_nonfinite_input(stats, names)
    if found is None:
        return
    name, what = found
    raise QuantcalError(f"the input of layer {name} {what} {where}; {nonfinite_hint(dtype)}")


def nonfinite_hint(dtype: torch.dtype) -> str:
    """What to do about a NaN/Inf activation in a model running in ``dtype``."""
    if dtype in (torch.float16, torch.bfloat16):
        return (f"the model runs in {str(dtype).removeprefix('torch.')}, whose range the "
                "activations before it likely overflow: rerun with --dtype float32")
    return ("the layers before it produce values beyond the float32 range although the "
            "weights are finite: check the checkpoint (a weight far too large?)")


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _progress(total_tokens: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total_tokens, desc=desc, unit="tok", unit_scale=True, disable=not enabled,
                dynamic_ncols=True)


@torch.inference_mode()
def collect_full(model: nn.Module, windows: torch.Tensor, modules: dict[str, nn.Module], *,
                 batch_size: int, device: torch.device, hessian: bool = False,
                 progress: bool = True, cuda_graph: bool | None = None
                 ) -> dict[str, LayerStats]:
    """Statistics of every module in ``modules`` over ``windows`` (S, L), whole model at once.

    Args:
        cuda_graph: replay the hooked forward as a CUDA graph (default: on CUDA). The hooks
            never synchronise, so the whole pass (model and statistics) is captured once and
            replayed per batch, removing the per-kernel launch cost of ~10 small kernels per
            layer. Falls back to eager execution if capture fails.
    """
    stats = new_stats(modules, device, hessian)
    batches = _batches(windows, batch_size)
    use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    dtype = model_dtype(model)

    def check(i: int) -> None:  # once per batch; a NaN/Inf stays in the running statistics
        check_finite_inputs(stats, modules, f"in batch {i + 1} of {len(batches)}", dtype)

    with stat_hooks(modules, stats), _progress(windows.numel(), "calibrate", progress) as bar:
        if use_graph and len(batches) > 2:
            _graphed_passes(model, batches, device, bar, check)
        else:
            for i, batch in enumerate(batches):
                model(input_ids=batch.to(device), use_cache=False)
                check(i)
                bar.update(batch.numel())
    for s in stats.values():  # capture runs the hooks' Python once without data
        s.tokens = windows.numel()
    return stats


def _graphed_passes(model: nn.Module, batches: list[torch.Tensor], device: torch.device,
                    bar: tqdm, check: Callable[[int], None]) -> None:
    """Run ``batches`` through ``model``: the first eagerly (warm-up), the full-size ones by
    replaying one captured CUDA graph, a smaller last one eagerly; ``check(i)`` after each
    (outside the graph)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs require
        model(input_ids=batches[0].to(device), use_cache=False)
    torch.cuda.current_stream(device).wait_stream(side)
    check(0)
    bar.update(batches[0].numel())
    static = batches[1].to(device).clone()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            model(input_ids=static, use_cache=False)
    except RuntimeError as exc:
        log.warning("CUDA graph capture failed (%s); continuing eagerly",
                    str(exc).splitlines()[0])
        graph = None
    for i, batch in enumerate(batches[1:], start=1):
        if graph is not None and batch.shape == static.shape:
            static.copy_(batch, non_blocking=True)
            graph.replay()
        else:
            model(input_ids=batch.to(device), use_cache=False)
        check(i)
        bar.update(batch.numel())


@dataclass
class BlockInputs:
    """One batch's inputs to a decoder block: positional args and keyword args, and the
    keyword args the model passes each block (``per_block``: Gemma 2/3 give sliding and
    global layers their own masks and rotary tables; :func:`use_block_` selects them)."""

    args: tuple
    kwargs: dict[str, Any] = field(default_factory=dict)
    per_block: list[dict[str, Any]] = field(default_factory=list)


class BlockRecorder(nn.Module):
    """Stands in for a decoder block: records what the model passes it and returns the
    hidden states unchanged, so one cheap forward gives every block its own arguments."""

    def __init__(self, block: nn.Module, calls: list[BlockInputs]):
        super().__init__()
        self.block = block
        self.calls = calls

    def forward(self, *args, **kwargs):
        self.calls.append(BlockInputs(args, kwargs))
        return args[0]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)  # e.g. attention_type


def block_arguments(model: nn.Module, windows: torch.Tensor, *, batch_size: int,
                    device: torch.device) -> list[list[BlockInputs]]:
    """Per block, per batch of ``windows`` (S, L), the arguments the model passes that block
    (its own mask and rotary tables); the hidden states are real for the first block only.
    No block runs, nor the head (the blocks' parent, the base model, runs); everything but
    the blocks must be on ``device``."""
    family = family_of(model)
    parent_name, _, attr = family.blocks.rpartition(".")
    parent = model.get_submodule(parent_name)
    blocks = getattr(parent, attr)
    calls: list[list[BlockInputs]] = [[] for _ in blocks]
    setattr(parent, attr, nn.ModuleList([BlockRecorder(b, c) for b, c in zip(blocks, calls)]))
    try:
        with torch.inference_mode():
            for batch in _batches(windows, batch_size):  # each (B, L)
                parent(input_ids=batch.to(device), use_cache=False)
    finally:
        setattr(parent, attr, blocks)
    return calls


def capture_block_inputs(model: nn.Module, windows: torch.Tensor, *, batch_size: int,
                         device: torch.device) -> list[BlockInputs]:
    """The activation cache: per batch, the first decoder block's inputs and every block's
    keyword arguments (:func:`use_block_` before running block i). No block runs.

    Everything but the blocks must already be on ``device``.
    """
    calls = block_arguments(model, windows, batch_size=batch_size, device=device)
    return [BlockInputs(first.args, first.kwargs, [c[j].kwargs for c in calls])
            for j, first in enumerate(calls[0])]


def use_block_(cache: list[BlockInputs], i: int) -> None:
    """Give every cached batch block ``i``'s own keyword arguments."""
    for item in cache:
        if item.per_block:
            item.kwargs = item.per_block[i]


def _module_device_(model: nn.Module, family, device: torch.device) -> None:
    """Move everything except the decoder blocks to ``device`` (blocks go to the CPU; a
    lazily loaded model's stay in its checkpoint and are read onto ``device`` from now)."""
    if store_of(model) is not None:
        to_device_(model, device)
        return
    blocks = blocks_of(model, family)
    blocks.to("cpu")
    for name, child in model.named_children():
        if child is not blocks:
            _move_except(child, blocks, device)


def _move_except(module: nn.Module, keep: nn.Module, device: torch.device) -> None:
    if module is keep:
        return
    if any(m is keep for m in module.modules()):
        for child in module.children():
            _move_except(child, keep, device)
        for p in module.parameters(recurse=False):
            p.data = p.data.to(device)
        for name, b in module.named_buffers(recurse=False):
            setattr(module, name, b.to(device))
    else:
        module.to(device)


@contextlib.contextmanager
def block_on_device(model: nn.Module, i: int, device: torch.device,
                    home: torch.device | str = "cpu") -> Iterator[nn.Module]:
    """Decoder block ``i`` on ``device`` for the duration: a lazily loaded model's held
    (read from its checkpoint, onto the device :func:`_module_device_` gave it, and dropped
    after, changes to its weights with it), else moved there and back to ``home``."""
    block = blocks_of(model, family_of(model))[i]
    if store_of(model) is not None:
        with block_weights(model, i):
            yield block
        return
    block.to(device)
    try:
        yield block
    finally:
        block.to(home)


def propagate_(block: nn.Module, cache: list[BlockInputs],
               each: Callable[[torch.Tensor], None] | None = None) -> None:
    """Run ``block`` on every cached batch; its output ``(B, L, C)`` becomes that batch's
    hidden states (``each`` is called with it)."""
    for item in cache:
        out = block(*item.args, **item.kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        item.args = (hidden,) + tuple(item.args[1:])
        if each is not None:
            each(hidden)


@torch.inference_mode()
def collect_sequential(model: nn.Module, windows: torch.Tensor, modules: dict[str, nn.Module], *,
                       batch_size: int, device: torch.device, progress: bool = True
                       ) -> dict[str, LayerStats]:
    """Same statistics as :func:`collect_full`, one decoder block on ``device`` at a time
    (no X^T X: the block-by-block GPTQ of :mod:`.gptq` builds its own Hessians)."""
    family = family_of(model)
    blocks = blocks_of(model, family)
    _module_device_(model, family, device)
    cache = capture_block_inputs(model, windows, batch_size=batch_size, device=device)
    stats = new_stats(modules, device, hessian=False)
    dtype = model_dtype(model)
    total = windows.numel() * len(blocks)
    with _progress(total, "calibrate (sequential)", progress) as bar:
        for i in range(len(blocks)):
            prefix = f"{family.blocks}.{i}."
            mine = {n: m for n, m in modules.items() if n.startswith(prefix)}
            use_block_(cache, i)
            with block_on_device(model, i, device) as block, stat_hooks(mine, stats):
                propagate_(block, cache, lambda hidden: bar.update(hidden.shape[0] *
                                                                   hidden.shape[1]))
            check_finite_inputs(stats, mine, f"in block {i}", dtype)
    rest = _head_stats(model, family, cache, modules, stats)
    check_finite_inputs(stats, rest, "after the last block", dtype)
    return stats


def _head_stats(model, family, cache: list[BlockInputs], modules: dict[str, nn.Module],
                stats: dict[str, LayerStats]) -> dict[str, nn.Module]:
    """Run the final norm and head on the last hidden states, with hooks on the head;
    returns the modules hooked."""
    rest = {n: m for n, m in modules.items() if not n.startswith(family.blocks + ".")}
    norm = model.get_submodule(family.final_norm)
    head = model.get_submodule(family.lm_head)
    with stat_hooks(rest, stats):
        for item in cache:
            head(norm(item.args[0]))
    return rest
