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

import numpy as np
import onnx
import onnxruntime as ort

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


class GraphRunner(DecoderRunner):
    """A :class:`DecoderRunner` whose decode steps have fixed shapes; with a session made
    by ``make_session(..., cuda_graph=True)`` on CUDA they replay one captured graph."""

    def __init__(self, session: ort.InferenceSession, provider: str, *, cuda_graph: bool):
        super().__init__(session, provider)
        if not self.shares_cache:
            raise ValueError("fixed-shape decoding needs a shared cache (GroupQueryAttention); "
                             "re-export the model with this version of quantcal")
        self.cuda_graph = cuda_graph
        self._slots: OrderedDict[tuple[int, int], _Slot] = OrderedDict()
        self._graphs = 0  # graph ids handed out (each captured once)
        self._slot: _Slot | None = None
        if cuda_graph:
            self._run_options = ort.RunOptions()
            self._run_options.add_run_config_entry(_GRAPH_ID, "-1")  # prefill: not captured

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                *, host_logits: bool = True, cache_length: int | None = None
                ) -> np.ndarray | ort.OrtValue:
        """As :meth:`DecoderRunner.prefill`; ``cache_length`` is required."""
        if cache_length is None:
            raise ValueError("fixed-shape decoding needs cache_length")
        return super().prefill(input_ids, attention_mask, host_logits=host_logits,
                               cache_length=cache_length)

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
        device = (self.provider, self.device_id)

        def zeros(shape, dtype):
            return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, *device)

        slot.ids, slot.positions = zeros([batch, 1], np.int64), zeros([batch, 1], np.int64)
        slot.mask = zeros([batch, self._capacity], np.int64)
        slot.logits = zeros([batch, 1, self._vocab()], self.spec.dtype)
        slot.total = np.array(self._capacity, dtype=np.int32)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input("input_ids", slot.ids)
        binding.bind_ortvalue_input("position_ids", slot.positions)
        binding.bind_ortvalue_input("attention_mask", slot.mask)
        if self._wants_total:
            binding.bind_cpu_input("total_sequence_length", slot.total)
        for past, present, value in zip(self.spec.past_names, self.spec.present_names,
                                        slot.cache):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        binding.bind_ortvalue_output("logits", slot.logits)
        slot.binding = binding
        if self.cuda_graph:
            self._graphs += 1
            slot.options = ort.RunOptions()
            slot.options.add_run_config_entry(_GRAPH_ID, str(self._graphs))


def _shares_cache(path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(p.key == SHARED_CACHE_KEY and p.value == "1" for p in model.metadata_props)


def decoding_runner(path, provider: str = "auto") -> DecoderRunner:
    """The fastest runner for greedy decoding of an exported model: captured CUDA graphs
    on CUDA when the model shares its cache, else a plain :class:`DecoderRunner` (through
    :func:`~quantcal.session.make_session`: CPU with a notice when ``auto`` finds CUDA not
    working, an error when ``cuda`` does)."""
    if provider != "cpu" and _shares_cache(path):
        session, _ = cuda_session(Path(path), 0, cuda_graph=True)
        if session is not None:
            return GraphRunner(session, "cuda", cuda_graph=True)
    return DecoderRunner(*make_session(path, provider))
