"""Models larger than memory: decoder blocks whose weights stay in the checkpoint until used.

:func:`load_lazy` builds the model with its parameters on the meta device (accelerate's
``init_empty_weights``; buffers such as the rotary frequencies are computed as transformers
computes them), reads what lies outside the decoder blocks (embeddings, final norm, head)
at once, and leaves every block's parameters in the memory-mapped safetensors files
(``safe_open``). A :class:`BlockStore` reads a block when it is acquired and puts its
parameters back on the meta device when its last holder releases it, so only the blocks in
use are in memory. Forward hooks hold a block around its own forward, so any forward pass
(calibration, a parity reference) holds one block at a time; code that reads weights
outside a forward holds them with :func:`block_weights` or :func:`held_blocks`, which do
nothing for a model loaded whole.

Checkpoint keys are the model's parameter names, with or without the model's
``base_model_prefix`` (GPT-2's older checkpoints), the two spellings transformers accepts;
a parameter with neither is refused at load, before anything else is read. Persistent
buffers are read from the checkpoint where it has them. Each tensor read takes the dtype the
model built in ``dtype`` gives it, as ``from_pretrained`` converts it. A block is checked
for NaN/Inf the first time it is read, the rest at load. :class:`TensorFile` reads a
safetensors file (a run's qparams) a tensor at a time in the same spirit.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from quantcal.errors import QuantcalError

STORE_ATTR = "_quantcal_block_store"
INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
Slot = tuple[nn.Module, str]  # (module, parameter name in its _parameters)


def store_of(model: nn.Module) -> "BlockStore | None":
    """The model's :class:`BlockStore` when it was loaded lazily, else None."""
    return getattr(model, STORE_ATTR, None)


class BlockStore:
    """Reads decoder blocks from the checkpoint on demand, counting their holders.

    Args:
        blocks: the model's decoder blocks, parameters on the meta device.
        prefix: their module path (``model.layers``).
        keys: ``{parameter name in the model: (file, checkpoint key)}`` of every block
            parameter.
        device: where the tensors read go (each in the dtype the model gives it).
        check: ``check(module, prefix)`` refuses non-finite weights (first read only).
    """

    def __init__(self, blocks: nn.ModuleList, prefix: str, keys: dict[str, tuple[str, str]],
                 device: torch.device, check: Callable[[nn.Module, str], None]):
        self.blocks, self.prefix, self.device = blocks, prefix, device
        self._check, self._checked = check, set()
        self.on_load: list[Callable[[int], None]] = []  # each runs on every block read
        self._held: dict[int, int] = {}
        self._empty: dict[int, list[tuple[Slot, nn.Parameter]]] = {}
        # per block: {id of its meta parameter: (slots holding it, file, key)}, made now so
        # that a block's own modules are filled even while stand-ins replace some of them
        self._slots: list[dict[int, tuple[list[Slot], str, str]]] = []
        for i, block in enumerate(blocks):
            found: dict[int, tuple[list[Slot], str, str]] = {}
            for mname, module in block.named_modules(remove_duplicate=False):
                for leaf, param in module._parameters.items():
                    if param is None:
                        continue
                    if id(param) not in found:
                        full = ".".join(p for p in (f"{prefix}.{i}", mname, leaf) if p)
                        found[id(param)] = ([], *keys[full])
                    found[id(param)][0].append((module, leaf))
            self._slots.append(found)

    def held(self) -> list[int]:
        """The blocks in memory now."""
        return sorted(self._held)

    def acquire(self, i: int) -> None:
        """Hold block ``i``; read it from the checkpoint unless already held."""
        if i not in self._held:
            self._load(i)
        self._held[i] = self._held.get(i, 0) + 1

    def release(self, i: int) -> None:
        """Drop one hold of block ``i``; its weights go back to meta with the last."""
        left = self._held[i] - 1
        if left:
            self._held[i] = left
            return
        del self._held[i]
        for (module, leaf), meta in self._empty.pop(i):
            module._parameters[leaf] = meta

    def _load(self, i: int) -> None:
        by_file: dict[str, list[tuple[list[Slot], str]]] = defaultdict(list)
        for slots, file, key in self._slots[i].values():
            by_file[file].append((slots, key))
        empty = []
        from safetensors import safe_open

        for file, entries in by_file.items():
            with safe_open(file, framework="pt") as f:  # memory-mapped; unmapped when freed
                for slots, key in entries:
                    meta = slots[0][0]._parameters[slots[0][1]]
                    tensor = f.get_tensor(key)
                    if tensor.is_floating_point():
                        tensor = tensor.to(meta.dtype)  # the model's dtype for it
                    param = nn.Parameter(tensor.to(self.device),
                                         requires_grad=meta.requires_grad)
                    for module, leaf in slots:
                        empty.append(((module, leaf), module._parameters[leaf]))
                        module._parameters[leaf] = param
        self._empty[i] = empty
        try:
            if i not in self._checked:
                self._check(self.blocks[i], f"{self.prefix}.{i}.")
                self._checked.add(i)
            for fn in self.on_load:
                fn(i)
        except BaseException:
            self._held[i] = 1
            self.release(i)
            raise

    def install_hooks(self) -> None:
        """Hold each block around its own forward."""
        for i, block in enumerate(self.blocks):
            block.register_forward_pre_hook(lambda m, a, i=i: self.acquire(i))
            block.register_forward_hook(lambda m, a, o, i=i: self.release(i), always_call=True)


@contextlib.contextmanager
def block_weights(model: nn.Module, *indices: int) -> Iterator[None]:
    """Hold blocks ``indices`` of a lazily loaded ``model`` (out-of-range ones ignored)
    for the duration; nothing for a model loaded whole."""
    store = store_of(model)
    held: list[int] = []
    try:
        if store is not None:
            for i in indices:
                if 0 <= i < len(store.blocks):
                    store.acquire(i)
                    held.append(i)
        yield
    finally:
        for i in held:
            store.release(i)  # type: ignore[union-attr]


@contextlib.contextmanager
def held_blocks(model: nn.Module) -> Iterator[Callable[..., None]]:
    """A sliding window over a lazily loaded model's blocks: ``hold(i, j, ...)`` holds those
    blocks and releases the ones it held before that are not among them, so walking the
    blocks reads each once. Everything held is released on exit."""
    store = store_of(model)
    held: set[int] = set()

    def hold(*indices: int) -> None:
        if store is None:
            return
        wanted = {i for i in indices if 0 <= i < len(store.blocks)}
        for i in sorted(held - wanted):  # first, so that no more than wanted are in memory
            store.release(i)
            held.discard(i)
        for i in sorted(wanted - held):
            store.acquire(i)
            held.add(i)

    try:
        yield hold
    finally:
        hold()


class TensorFile(Mapping):
    """The tensors of a safetensors file, each read when looked up (into memory of its own,
    not a mapping of the file) and never kept: a run's qparams, which an export reads a
    layer at a time, never all in memory at once."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        try:
            self._file = safe_open(str(path), framework="pt", backend="pread")
        except TypeError:  # a safetensors without backends: a mapping, pages read as used
            self._file = safe_open(str(path), framework="pt")
        self._keys = list(self._file.keys())
        self._known = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._known:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def on_each_block_(model: nn.Module, fn: Callable[[int], None]) -> None:
    """Run ``fn(i)``, which changes block ``i``'s weights in place, on every block: now for
    a model loaded whole; each time block ``i`` is read for a lazily loaded one (the change
    is made again from the checkpoint's weights every time, so it must be deterministic)."""
    store = store_of(model)
    if store is not None:
        store.on_load.append(fn)
        return
    for i in range(len(model.get_submodule(_blocks_path(model)))):
        fn(i)


def _blocks_path(model: nn.Module) -> str:
    from quantcal.models import family_of

    return family_of(model).blocks


def to_device_(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``model.to(device)`` for a model loaded either way: a lazily loaded one moves what
    lies outside its blocks, and reads its blocks onto ``device`` from then on (none may be
    held meanwhile). Returns ``model``."""
    store = store_of(model)
    if store is None:
        return model.to(device)
    if store.held():
        raise RuntimeError(f"blocks {store.held()} are held; move the model between uses")
    todo, moved = [model], {}  # one moved tensor per tensor: tied weights stay tied
    while todo:
        module = todo.pop()
        for table in (module._parameters, module._buffers):
            for key, t in list(table.items()):
                if t is not None and id(t) not in moved:
                    new = t.detach().to(device)
                    moved[id(t)] = (nn.Parameter(new, requires_grad=t.requires_grad)
                                    if isinstance(t, nn.Parameter) else new)
                if t is not None:
                    table[key] = moved[id(t)]
        todo.extend(m for m in module.children() if m is not store.blocks)
    store.device = torch.device(device)
    return model


def materialize_(model: nn.Module, device: torch.device | str) -> nn.Module:
    """The whole model on ``device``: :func:`to_device_`, then every block of a lazily
    loaded one read (its ``on_load`` changes made) and held for the model's lifetime, so
    code that needs whole-model forwards (sensitivity) sees a model loaded whole. Returns
    ``model``."""
    store = store_of(model)
    if store is not None and getattr(store, "materialized", False):
        return model  # every block is held where it was read
    to_device_(model, device)
    if store is not None:
        for i in range(len(store.blocks)):
            store.acquire(i)
        store.materialized = True
    return model


def checkpoint_keys(source: str, revision: str | None, hub: dict) -> dict[str, str]:
    """``{checkpoint key: safetensors file}`` of a model folder or hub id (the files are
    fetched, or found in the cache, as ``from_pretrained`` would)."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    index = cached_file(source, INDEX, revision=revision,
                        _raise_exceptions_for_missing_entries=False, **hub)
    if index is not None:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        files = {name: cached_file(source, name, revision=revision, **hub)
                 for name in sorted(set(weight_map.values()))}
        return {key: files[name] for key, name in weight_map.items()}
    single = cached_file(source, SINGLE, revision=revision, **hub)
    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def match_keys(model: nn.Module, found: dict[str, str]) -> dict[str, tuple[str, str]]:
    """``{name: (file, checkpoint key)}`` of every parameter of ``model`` (a tied one once)
    and of every persistent buffer the checkpoint holds; a parameter the checkpoint lacks is
    refused."""
    prefix = getattr(model, "base_model_prefix", "") or ""

    def key_of(name: str) -> str | None:
        spellings = [name]
        if prefix:
            spellings.append(name[len(prefix) + 1:] if name.startswith(prefix + ".")
                             else f"{prefix}.{name}")
        return next((k for k in spellings if k in found), None)

    keys = {}
    for name, _ in model.named_parameters():
        key = key_of(name)
        if key is None:
            raise QuantcalError(f"the checkpoint has no weight for {name}; load the model "
                                "whole (without low-memory loading) to see what it holds")
        keys[name] = (found[key], key)
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for name in model.state_dict(keep_vars=True):
        key = key_of(name)
        if name not in params and key is not None:
            keys[name] = (found[key], key)
    return keys


def _load_outside(model: nn.Module, keys: dict[str, tuple[str, str]], device: torch.device
                  ) -> None:
    """Read the tensors ``keys`` names (outside the blocks) into ``model``."""
    from safetensors import safe_open

    by_file: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for name, (file, key) in keys.items():
        by_file[file].append((name, key))
    for file, entries in by_file.items():
        with safe_open(file, framework="pt") as f:
            for name, key in entries:
                owner, _, leaf = name.rpartition(".")
                module = model.get_submodule(owner)
                tensor = f.get_tensor(key)
                old = module._parameters.get(leaf, module._buffers.get(leaf))
                if tensor.is_floating_point() and old is not None:
                    tensor = tensor.to(old.dtype)  # the model's dtype for it
                tensor = tensor.to(device)
                if leaf in module._parameters:
                    module._parameters[leaf] = nn.Parameter(tensor,
                                                            requires_grad=old.requires_grad)
                else:
                    module._buffers[leaf] = tensor
    for module in model.modules():  # buffers the checkpoint does not hold: computed on CPU
        for leaf, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[leaf] = buf.to(device)


def load_lazy(source: str, config, blocks_path: str, *, revision: str | None,
              dtype: torch.dtype, device: torch.device, trust_remote_code: bool, hub: dict,
              check: Callable[[nn.Module, str], None]) -> nn.Module:
    """The model of ``source`` with its blocks (``blocks_path``) left in the checkpoint and
    everything else read, in ``dtype`` on ``device``, in eval mode; see the module doc.

    Args:
        config: the model's transformers config (``AutoConfig.from_pretrained``).
        check: ``check(module, prefix)`` refuses non-finite weights.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, GenerationConfig

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 trust_remote_code=trust_remote_code)
    model.tie_weights()
    keys = match_keys(model, checkpoint_keys(source, revision, hub))
    inside = {n: v for n, v in keys.items() if n.startswith(blocks_path + ".")}
    _load_outside(model, {n: v for n, v in keys.items() if n not in inside}, device)
    model.tie_weights()  # the head is the embedding's (re-read) table again
    check(model, "")
    blocks = model.get_submodule(blocks_path)
    store = BlockStore(blocks, blocks_path, inside, device, check)
    store.install_hooks()
    setattr(model, STORE_ATTR, store)
    with contextlib.suppress(OSError, ValueError):
        model.generation_config = GenerationConfig.from_pretrained(source, revision=revision,
                                                                   **hub)
    return model.eval()
