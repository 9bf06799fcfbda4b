"""Greedy decoding with fixed shapes, replayed as a CUDA graph.

With a shared cache (see :mod:`quantcal.runner`) every decode step runs the same kernels on
the same buffers; only a few values change: the new token, its position, and one more 1 in
the attention mask. Given fixed shapes, the mask padded with zeros to the cache length and
``total_sequence_length`` pinned to that length (GroupQueryAttention reads each row's true
length from ``seqlens_k``, the mask's row sums), onnxruntime can capture the step once as a
CUDA graph and replay it for every token, which removes its per-kernel launch cost (the
CUDA provider's ``enable_cuda_graph``, as onnxruntime-genai uses it). Prefill runs
uncaptured (``gpu_graph_id`` -1).

A captured graph refers to its buffers by address, so they are kept per (batch, cache
length) and a new sequence of the same shape reuses them; the least recently used of more
than ``MAX_SLOTS`` shapes is dropped (its graph is never replayed again). On the CPU
provider the same fixed-shape steps run without capture (this is what the CPU tests check).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnxruntime as ort

from quantcal.greedy import COLUMNS, NEXT_IDS, NEXT_MASK, NEXT_POSITIONS, OUTPUTS
from quantcal.greedy import greedy_model, has_greedy_outputs
from quantcal.runner import SHARED_CACHE_KEY, DecoderRunner, last_positions
from quantcal.session import cuda_session, make_session

_GRAPH_ID = "gpu_graph_id"
MAX_SLOTS = 8  # (batch, cache length) shapes whose buffers are kept for their graphs


@dataclass
class _Slot:
    """The fixed buffers and binding of one (batch, cache length) decode graph."""

    cache: list[ort.OrtValue]
    binding: ort.IOBinding | None = None
    ids: ort.OrtValue | None = None  # (B, 1) int64
    positions: ort.OrtValue | None = None  # (B, 1) int64
    mask: ort.OrtValue | None = None  # (B, C) int64, zeros past the sequence
    logits: ort.OrtValue | None = None  # (B, 1, V)
    total: np.ndarray | None = None  # int32 scalar C, read on the host
    options: ort.RunOptions | None = None
    greedy: "_Crosswise | None" = None  # the device-greedy bindings, made on first use


@dataclass
class _Crosswise:
    """Two bindings of the greedy model whose step inputs and ``greedy.*`` outputs are
    swapped: binding k reads ``ids[k]``, ``positions[k]``, ``mask[k]`` and writes the next
    step's into index ``1 - k``; each has its own captured graph."""

    ids: list[ort.OrtValue]  # (B, 1) int64 each
    positions: list[ort.OrtValue]  # (B, 1) int64
    mask: list[ort.OrtValue]  # (B, C) int64
    columns: ort.OrtValue  # (1, C) int64: 0..C-1
    bindings: list[ort.IOBinding]
    options: list[ort.RunOptions | None]


class GraphRunner(DecoderRunner):
    """A :class:`DecoderRunner` whose decode steps have fixed shapes; with a session made
    by ``make_session(..., cuda_graph=True)`` on CUDA they replay one captured graph."""

    def __init__(self, session: ort.InferenceSession, provider: str, *, cuda_graph: bool):
        super().__init__(session, provider)
        if not self.shares_cache:
            raise ValueError("fixed-shape decoding needs a shared cache (GroupQueryAttention); "
                             "re-export the model with this version of quantcal")
        self.cuda_graph = cuda_graph
        self.device_greedy = has_greedy_outputs(o.name for o in session.get_outputs())
        self._slots: OrderedDict[tuple[int, int], _Slot] = OrderedDict()
        self._graphs = 0  # graph ids handed out (each captured once)
        self._slot: _Slot | None = None
        if cuda_graph:
            self._run_options = ort.RunOptions()
            self._run_options.add_run_config_entry(_GRAPH_ID, "-1")  # prefill: not captured

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                *, host_logits: bool = True, cache_length: int | None = None,
                last_logits: bool = False) -> np.ndarray | ort.OrtValue:
        """As :meth:`DecoderRunner.prefill`; ``cache_length`` is required."""
        if cache_length is None:
            raise ValueError("fixed-shape decoding needs cache_length")
        return super().prefill(input_ids, attention_mask, host_logits=host_logits,
                               cache_length=cache_length, last_logits=last_logits)

    def _new_cache(self, batch: int, length: int) -> list[ort.OrtValue]:
        """The slot's cache buffers: allocated once per (batch, cache length)."""
        key = (batch, length)
        slot = self._slots.get(key)
        if slot is None:
            if len(self._slots) >= MAX_SLOTS:
                self._slots.popitem(last=False)
            slot = self._slots[key] = _Slot(super()._new_cache(batch, length))
        self._slots.move_to_end(key)
        self._slot = slot
        return slot.cache

    def _step(self, ids: np.ndarray, mask: np.ndarray, host_logits: bool = True
              ) -> np.ndarray | ort.OrtValue:
        if ids.shape[1] == mask.shape[1]:  # prefill: variable shapes, not captured
            return super()._step(ids, mask, host_logits)
        slot = self._slot
        if slot.binding is None:
            self._bind(slot, ids.shape[0])
        padded = np.zeros((mask.shape[0], self._capacity), dtype=np.int64)
        padded[:, :mask.shape[1]] = mask
        positions = last_positions(mask, 1)
        slot.ids.update_inplace(np.ascontiguousarray(ids))
        slot.positions.update_inplace(np.ascontiguousarray(positions))
        slot.mask.update_inplace(padded)
        self.session.run_with_iobinding(slot.binding, slot.options)
        self._mask = mask
        if not host_logits:
            return slot.logits
        return slot.logits.numpy().copy()  # the buffer is overwritten by the next step

    def _bind(self, slot: _Slot, batch: int) -> None:
        """Fixed device buffers for the decode step, bound once; the graph id is the
        slot's, so each (batch, cache length) is captured once."""
        zeros = self._zeros
        slot.ids, slot.positions = zeros([batch, 1], np.int64), zeros([batch, 1], np.int64)
        slot.mask = zeros([batch, self._capacity], np.int64)
        slot.logits = zeros([batch, 1, self._vocab()], self.spec.dtype)
        slot.total = np.array(self._capacity, dtype=np.int32)
        binding = self._step_binding(slot, slot.ids, slot.positions, slot.mask)
        if self.device_greedy:  # unread here, but a captured graph needs fixed outputs
            for name in OUTPUTS:
                binding.bind_ortvalue_output(name, zeros([batch, 1], np.int64))
        slot.binding = binding
        slot.options = self._graph_options()

    def _step_binding(self, slot: _Slot, ids: ort.OrtValue, positions: ort.OrtValue,
                      mask: ort.OrtValue) -> ort.IOBinding:
        """A decode step's binding on fixed buffers: these inputs, the slot's cache (past
        and present one buffer), total length and logits."""
        binding = self.session.io_binding()
        binding.bind_ortvalue_input("input_ids", ids)
        binding.bind_ortvalue_input("position_ids", positions)
        binding.bind_ortvalue_input("attention_mask", mask)
        if self._wants_total:
            binding.bind_cpu_input("total_sequence_length", slot.total)
        for past, present, value in zip(self.spec.past_names, self.spec.present_names,
                                        slot.cache):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        binding.bind_ortvalue_output("logits", slot.logits)
        return binding

    def _graph_options(self) -> ort.RunOptions | None:
        """Run options with a new graph id (each binding is captured once), or None."""
        if not self.cuda_graph:
            return None
        self._graphs += 1
        options = ort.RunOptions()
        options.add_run_config_entry(_GRAPH_ID, str(self._graphs))
        return options

    def _zeros(self, shape: list[int], dtype) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, self.provider,
                                                         self.device_id)

    def greedy(self, logits, count: int) -> Iterator[np.ndarray]:
        """As :meth:`DecoderRunner.greedy`; with the greedy model (:mod:`quantcal.greedy`)
        and unpadded rows, each step's next ids, position and mask stay on the device and
        feed the next step directly: one graph replay and one copy of B ids per token."""
        if not self.device_greedy or count <= 1 or not self._mask.all():
            yield from super().greedy(logits, count)
            return
        next_ids = self.next_tokens(logits)
        yield next_ids
        slot, batch = self._slot, self._mask.shape[0]
        if slot.greedy is None:
            slot.greedy = self._crosswise(slot, batch)
        cross = slot.greedy
        past = self._mask.shape[1]  # the first step's token sits at this position
        padded = np.zeros((batch, self._capacity), dtype=np.int64)
        padded[:, :past + 1] = 1
        cross.ids[0].update_inplace(np.ascontiguousarray(next_ids))
        cross.positions[0].update_inplace(np.full((batch, 1), past, dtype=np.int64))
        cross.mask[0].update_inplace(padded)
        for i in range(count - 1):
            if self._mask.shape[1] >= self._capacity:
                raise RuntimeError(f"the cache is full ({self._capacity} positions): prefill "
                                   "with a larger cache_length")
            k = i % 2
            self.session.run_with_iobinding(cross.bindings[k], cross.options[k])
            self._mask = np.ones((batch, self._mask.shape[1] + 1), dtype=np.int64)
            yield cross.ids[1 - k].numpy().copy()  # a CPU buffer's numpy() is a view

    def _crosswise(self, slot: _Slot, batch: int) -> _Crosswise:
        """The two greedy bindings of a slot, on its cache and logits buffers."""
        if slot.binding is None:
            self._bind(slot, batch)
        cap = self._capacity
        cross = _Crosswise(
            ids=[self._zeros([batch, 1], np.int64) for _ in range(2)],
            positions=[self._zeros([batch, 1], np.int64) for _ in range(2)],
            mask=[self._zeros([batch, cap], np.int64) for _ in range(2)],
            columns=self._zeros([1, cap], np.int64), bindings=[], options=[])
        cross.columns.update_inplace(np.arange(cap, dtype=np.int64).reshape(1, cap))
        for k in range(2):
            b = self._step_binding(slot, cross.ids[k], cross.positions[k], cross.mask[k])
            b.bind_ortvalue_input(COLUMNS, cross.columns)
            b.bind_ortvalue_output(NEXT_IDS, cross.ids[1 - k])
            b.bind_ortvalue_output(NEXT_POSITIONS, cross.positions[1 - k])
            b.bind_ortvalue_output(NEXT_MASK, cross.mask[1 - k])
            cross.bindings.append(b)
            cross.options.append(self._graph_options())
        return cross


def _shares_cache(path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(p.key == SHARED_CACHE_KEY and p.value == "1" for p in model.metadata_props)


def decoding_runner(path, provider: str = "auto") -> DecoderRunner:
    """The fastest runner for greedy decoding of an exported model: captured CUDA graphs
    of the greedy model (:mod:`quantcal.greedy`) on CUDA when the model shares its cache,
    else a plain :class:`DecoderRunner` (through
    :func:`~quantcal.session.make_session`: CPU with a notice when ``auto`` finds CUDA not
    working, an error when ``cuda`` does)."""
    if provider != "cpu" and _shares_cache(path):
        session, _ = cuda_session(Path(path), 0, cuda_graph=True, model=greedy_model(path))
        if session is None:  # the greedy nodes refused: the graph replays all the same
            session, _ = cuda_session(Path(path), 0, cuda_graph=True)
        if session is not None:
            return GraphRunner(session, "cuda", cuda_graph=True)
    return DecoderRunner(*make_session(path, provider))
