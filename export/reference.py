"""The torch reference of export parity: the plan's fake-quant model, one block at a time.

Inside :func:`fake_quant_reference`, ``model`` computes as the plan's fake-quant model
(:mod:`quantcal.fakequant` stand-ins) converted to ``dtype`` and moved to ``device``: the
same numbers as a deep copy of the model with every stand-in swapped in, then ``.double()``
(or ``.half()``) and ``.to(device)``, without the copy. The layers outside the decoder
blocks (embedding, head) get their stand-ins for the whole context and every tensor outside
the blocks is converted once; a block gets its stand-ins, and its tensors converted, in a
forward pre-hook, and loses them in its forward hook. So at most one block's fake-quant
weights exist at a time (and, for a model loaded with ``low_memory``, one block's weights:
the hook holds the block, :mod:`quantcal.lazymodel`). Stand-ins are made from the weights
as loaded and converted after, as the copy converted them. The model's own tensors are
never written: converted ones are put in their place, and put back on exit.

``observe(name, x, y)`` sees the input and output of every planned layer
(:mod:`quantcal.export.layer_parity` captures them).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from quantcal.fakequant import (
    act_qparams, embedding_qparams, fake_quant_module, layer_qparams, swapped,
)
from quantcal.formats import FP16, Format
from quantcal.models import block_index, block_weights, blocks_of, family_of

Observer = Callable[[str, torch.Tensor, torch.Tensor], None]
Convert = Callable[[torch.Tensor], torch.Tensor]


def _converter(dtype: torch.dtype | None, device: torch.device | str | None) -> Convert:
    """What ``.to(dtype)`` (floating tensors only, as ``.double()``/``.half()``) then
    ``.to(device)`` make of one tensor (the tensor itself when nothing changes)."""
    def convert(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t if device is None else t.to(device)
    return convert


def _convert_(modules: list[nn.Module], convert: Convert, stack: contextlib.ExitStack) -> None:
    """Put converted copies in place of the parameters and buffers of ``modules`` (their
    own, not their children's), one copy per tensor however many modules hold it; the
    originals come back when ``stack`` closes."""
    made: dict[int, torch.Tensor] = {}
    put: list[tuple[dict, str, torch.Tensor]] = []
    for module in modules:
        for table in (module._parameters, module._buffers):
            for key, t in list(table.items()):
                if t is None:
                    continue
                if id(t) not in made:
                    plain = t.detach()
                    new = convert(plain)
                    if new is plain:
                        new = t
                    elif isinstance(t, nn.Parameter):
                        new = nn.Parameter(new, requires_grad=False)
                    made[id(t)] = new
                if made[id(t)] is not t:
                    put.append((table, key, t))
                    table[key] = made[id(t)]

    def restore() -> None:
        for table, key, t in reversed(put):
            table[key] = t
    stack.callback(restore)


def _outside(model: nn.Module, blocks: nn.Module) -> list[nn.Module]:
    """Every module of ``model`` but the blocks and what they hold."""
    out, todo = [], [model]
    while todo:
        module = todo.pop()
        out.append(module)
        todo.extend(m for m in module.children() if m is not blocks)
    return out


def _stand_in(model: nn.Module, name: str, formats: Mapping[str, Format],
              qparams: Mapping[str, torch.Tensor]) -> nn.Module:
    """Layer ``name``'s fake-quant stand-in, as :func:`quantcal.fakequant.fake_quant_modules`
    makes it."""
    module, fmt = model.get_submodule(name), formats[name]
    if isinstance(module, nn.Embedding):
        return fake_quant_module(module, fmt, embedding_qparams(model, name, formats, qparams))
    return fake_quant_module(module, fmt, layer_qparams(qparams, name, fmt),
                             act_qparams(qparams, name))


def _observed(model: nn.Module, names: list[str], observe: Observer | None,
              stack: contextlib.ExitStack) -> None:
    """Forward hooks passing each layer's input and output to ``observe`` until ``stack``
    closes."""
    if observe is None:
        return
    for name in names:
        hook = (lambda n: lambda m, args, out: observe(n, args[0], out))(name)
        stack.callback(model.get_submodule(name).register_forward_hook(hook).remove)


class _Block:
    """Block ``i``'s hooks: in, its stand-ins and converted tensors; out, the originals."""

    def __init__(self, model: nn.Module, i: int, names: list[str], make: Callable,
                 convert: Convert, observe: Observer | None):
        self.model, self.i, self.names, self.make = model, i, names, make
        self.convert, self.observe = convert, observe
        self.stack: contextlib.ExitStack | None = None

    def enter(self, module: nn.Module, args) -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(block_weights(self.model, self.i))
            standins = {n: s for n in self.names if (s := self.make(n)) is not None}
            stack.enter_context(swapped(self.model, standins))
            _convert_(list(module.modules()), self.convert, stack)
            _observed(self.model, self.names, self.observe, stack)
            self.stack = stack.pop_all()  # kept until exit; undone at once on an error

    def exit(self, module: nn.Module, args, out) -> None:
        if self.stack is not None:
            self.stack, stack = None, self.stack
            stack.close()


@contextlib.contextmanager
def fake_quant_reference(model: nn.Module, formats: Mapping[str, Format],
                         qparams: Mapping[str, torch.Tensor], *,
                         dtype: torch.dtype | None = None,
                         device: torch.device | str | None = None,
                         observe: Observer | None = None) -> Iterator[nn.Module]:
    """``model`` as the plan's fake-quant model in ``dtype`` on ``device`` (None: as
    loaded, where loaded), for the duration; see the module doc.

    Args:
        formats, qparams: the plan's formats (fp16 layers keep their weights; ``{}``: no
            stand-ins) and the run's qparams.
        observe: ``observe(layer, x, y)`` for every layer of ``formats`` on each forward.
    """
    family = family_of(model)
    blocks = blocks_of(model, family)
    inside: dict[int, list[str]] = {i: [] for i in range(len(blocks))}
    outside: list[str] = []
    for name in formats:
        i = block_index(model, name)
        (outside if i is None else inside[i]).append(name)

    def make(name: str) -> nn.Module | None:
        fmt = formats[name]
        return None if isinstance(fmt, FP16) else _stand_in(model, name, formats, qparams)

    convert = _converter(dtype, device)
    with contextlib.ExitStack() as stack:
        standins = {n: s for n in outside if (s := make(n)) is not None}
        stack.enter_context(swapped(model, standins))
        _convert_(_outside(model, blocks), convert, stack)
        _observed(model, outside, observe, stack)
        for i, block in enumerate(blocks):
            hooks = _Block(model, i, inside[i], make, convert, observe)
            stack.callback(block.register_forward_pre_hook(hooks.enter).remove)
            stack.callback(block.register_forward_hook(hooks.exit, always_call=True).remove)
        yield model


def tensor_count(model: nn.Module) -> int:
    """Elements of the parameters and buffers of ``model`` (each tensor once), blocks left
    in the checkpoint included: what a copy of it would hold."""
    seen = {id(t): t.numel() for t in [*model.parameters(), *model.buffers()]}
    return sum(seen.values())
