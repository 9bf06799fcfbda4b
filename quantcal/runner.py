"""Prefill, decode and greedy generation on an exported decoder, KV cache kept on device.

Reads the decoder contract from the session's input and output metadata:

- inputs: ``input_ids`` int64 (B, S); ``attention_mask`` int64 (B, P+S); ``position_ids``
  int64 (B, S); ``past_key_values.{i}.key`` / ``.value`` (B, kv_heads, P, head_dim) in the
  activation dtype, for i in 0..L-1 (P may be 0);
- outputs: ``logits`` (B, S, V); ``present.{i}.key`` / ``.value`` (B, kv_heads, P+S, head_dim).

Each step runs through onnxruntime IO binding: the ``present.*`` OrtValues of one step are
bound as the ``past_key_values.*`` inputs of the next, so the cache never leaves the
session's device. Greedy decoding leaves the logits on the device too: a two-node argmax
graph on the same provider picks the next token, so per step only the token ids, the
attention mask and positions go host -> device and one token id per sequence comes back.

With ``cache_length`` (as generation uses it) the cache is allocated once for the whole
sequence and each layer's past and present are bound to the same device buffer:
GroupQueryAttention then writes the new positions in place (as onnxruntime-genai runs it),
with no per-step allocation or copy of the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from quantcal.errors import QuantcalError

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_ONNX_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}
_ID_INPUTS = ("input_ids", "attention_mask", "position_ids")
LOGITS_FROM = "logits_from"  # optional input of newer exports (quantcal.export.layers)
# model metadata: every cache input/output pair may be bound to one buffer (GroupQueryAttention)
SHARED_CACHE_KEY = "quantcal.shared_kv_cache"


@dataclass(frozen=True)
class DecoderSpec:
    """What a session says about the exported decoder."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: np.dtype
    vocab_size: int | None  # None when the graph leaves it symbolic

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kind}" for i in range(self.num_layers)
                for kind in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"present.{i}.{kind}" for i in range(self.num_layers)
                for kind in ("key", "value")]


def _not_a_decoder(what: str) -> QuantcalError:
    return QuantcalError(f"the model is not a quantcal decoder: {what}; "
                         "re-export it with `quantcal export`")


def read_spec(session: ort.InferenceSession) -> DecoderSpec:
    """Check a session against the decoder contract and read its sizes from the metadata."""
    inputs = {arg.name: arg for arg in session.get_inputs()}
    outputs = {arg.name: arg for arg in session.get_outputs()}
    for name in _ID_INPUTS:
        if name not in inputs:
            raise _not_a_decoder(f"input {name!r} is missing")
    num_layers = sum(1 for name in inputs if name.startswith("past_key_values."))
    if num_layers == 0 or num_layers % 2:
        raise _not_a_decoder("no past_key_values.{i}.key/value inputs")
    num_layers //= 2
    first = inputs.get("past_key_values.0.key")
    if first is None or first.type not in _DTYPES:
        raise _not_a_decoder("past_key_values.0.key is missing or not float16/float32")
    kv_heads, head_dim = first.shape[1], first.shape[3]
    if not (isinstance(kv_heads, int) and isinstance(head_dim, int)):
        raise _not_a_decoder("kv_heads and head_dim of the cache are not fixed sizes")
    spec = DecoderSpec(num_layers, kv_heads, head_dim, np.dtype(_DTYPES[first.type]),
                       None)
    for name in spec.past_names:
        arg = inputs.get(name)
        if arg is None or arg.type != first.type or arg.shape[1::2] != [kv_heads, head_dim]:
            raise _not_a_decoder(f"cache input {name!r} is missing or differs from layer 0")
    for name in ["logits", *spec.present_names]:
        if name not in outputs:
            raise _not_a_decoder(f"output {name!r} is missing")
    vocab = outputs["logits"].shape[-1]
    return DecoderSpec(num_layers, kv_heads, head_dim, spec.dtype,
                       vocab if isinstance(vocab, int) else None)


def argmax_graph(dtype: np.dtype) -> bytes:
    """``next_ids`` (B, 1) int64 = argmax over the vocabulary of ``logits`` (B, S, V) at the
    last position: greedy decoding's only device -> host copy is this one id per row."""
    last = helper.make_tensor("last", TensorProto.INT64, [], [-1])
    graph = helper.make_graph(
        [helper.make_node("Gather", ["logits", "last"], ["last_logits"], axis=1),
         helper.make_node("ArgMax", ["last_logits"], ["next_ids"], axis=-1, keepdims=1)],
        "greedy_argmax",
        [helper.make_tensor_value_info("logits", _ONNX_TYPES[np.dtype(dtype)],
                                       ["batch", "seq", "vocab"])],
        [helper.make_tensor_value_info("next_ids", TensorProto.INT64, ["batch", 1])],
        initializer=[last])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def last_positions(mask: np.ndarray, seq: int) -> np.ndarray:
    """Position ids (B, seq) of the last ``seq`` tokens of ``mask`` (B, P+S): each counts the
    attended tokens before it, ``arange(P, P+S)`` for full masks."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -seq:]


def _as_ids(array: np.ndarray | list, name: str) -> np.ndarray:
    ids = np.ascontiguousarray(np.asarray(array), dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (batch, seq) array, got shape {ids.shape}")
    return ids


class DecoderRunner:
    """Runs one exported decoder session; holds the KV cache of the current sequences."""

    def __init__(self, session: ort.InferenceSession, provider: str):
        if provider not in ("cuda", "cpu"):
            raise ValueError(f"provider must be 'cuda' or 'cpu', got {provider!r}")
        self.session = session
        self.provider = provider
        self.spec = read_spec(session)
        options = session.get_provider_options().get("CUDAExecutionProvider", {})
        self.device_id = int(options.get("device_id", 0)) if provider == "cuda" else 0
        inputs = {i.name for i in session.get_inputs()}
        self._wants_total = "total_sequence_length" in inputs
        self._takes_logits_from = LOGITS_FROM in inputs
        self._logits_from = np.zeros(1, dtype=np.int64)
        metadata = session.get_modelmeta().custom_metadata_map
        self.shares_cache = metadata.get(SHARED_CACHE_KEY) == "1"
        self._cache: list[ort.OrtValue] = []  # past of the next step, in spec.past_names order
        self._mask = np.zeros((0, 0), dtype=np.int64)  # (B, P) on host
        self._capacity: int | None = None  # positions of a preallocated (shared) cache
        self._binding = session.io_binding()
        self._run_options: ort.RunOptions | None = None  # for subclasses' prefill runs
        self._argmax = self._argmax_session()
        self._argmax_binding = self._argmax.io_binding() if self._argmax else None
        self._argmax_bound: ort.OrtValue | None = None
        self._step_logits: ort.OrtValue | None = None  # a shared cache's (B, 1, V) logits

    @property
    def past_length(self) -> int:
        """P: how many positions the cache holds (0 before prefill)."""
        if self._capacity is not None:
            return self._mask.shape[1]
        return self._cache[0].shape()[2] if self._cache else 0

    def cache_lengths(self) -> list[int]:
        """P of every cache tensor, read from the device values' shapes (no copy)."""
        return [value.shape()[2] for value in self._cache]

    def reset(self) -> None:
        """Drop the cache, freeing its device memory."""
        self._cache = []
        self._mask = np.zeros((0, 0), dtype=np.int64)
        self._capacity = None
        self._step_logits = self._argmax_bound = None
        self._binding.clear_binding_inputs()
        self._binding.clear_binding_outputs()

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                *, host_logits: bool = True, cache_length: int | None = None,
                last_logits: bool = False) -> np.ndarray | ort.OrtValue:
        """Start new sequences: run ``input_ids`` (B, S) with an empty cache.

        ``attention_mask`` (B, S) defaults to all ones; rows may be right-padded, never
        left-padded (refused). Returns logits (B, S, V) on host, or
        left on the device as an OrtValue with ``host_logits=False``. ``cache_length``:
        allocate the cache once for this many positions (prompt plus every token to come),
        updated in place by each step; without it each step returns a cache one longer.
        ``last_logits``: logits (B, 1, V) of the last position only (an export with a
        ``logits_from`` input computes no others; rows without padding).
        """
        ids = _as_ids(input_ids, "input_ids")
        mask = np.ones_like(ids) if attention_mask is None else _as_ids(attention_mask,
                                                                       "attention_mask")
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask {mask.shape} must match input_ids {ids.shape}")
        if (np.diff(mask, axis=1) > 0).any():
            raise ValueError("attention_mask must be right-padded (each row's ones first, "
                             "then zeros): the exported graph takes each row's positions from "
                             "its count of ones, so a left-padded row would get wrong logits")
        if cache_length is not None and not self.shares_cache:
            raise ValueError("this model's cache cannot be updated in place (re-export it "
                             "with this version of quantcal); prefill without cache_length")
        if cache_length is not None and not mask.all():
            raise ValueError("a cache updated in place holds rows without padding only (a "
                             "padded row's steps would be written after its pad); prefill "
                             "padded rows without cache_length")
        if cache_length is not None and cache_length < ids.shape[1]:
            raise ValueError(f"cache_length {cache_length} is shorter than the prompt "
                             f"({ids.shape[1]} tokens)")
        if last_logits and not mask.all():
            raise ValueError("last_logits needs rows without padding (the last position of "
                             "a padded row is not its last token)")
        self.reset()
        self._capacity = cache_length
        self._cache = self._new_cache(ids.shape[0], cache_length or 0)
        self._logits_from = np.array([-1 if last_logits else 0], dtype=np.int64)
        logits = self._step(ids, mask, host_logits)
        if last_logits and not self._takes_logits_from:  # an older export: every position
            return logits[:, -1:] if isinstance(logits, np.ndarray) else logits
        return logits

    def decode_step(self, next_ids: np.ndarray, *, host_logits: bool = True
                    ) -> np.ndarray | ort.OrtValue:
        """Append one token per sequence, ``next_ids`` (B, 1); returns logits (B, 1, V), on
        the host or (``host_logits=False``) left on the device, where a shared cache's
        steps reuse one buffer: read it before the next step."""
        ids = _as_ids(next_ids, "next_ids")
        if not self._cache:
            raise RuntimeError("decode_step before prefill: there is no cache to extend")
        if ids.shape != (self._mask.shape[0], 1):
            raise ValueError(f"next_ids must have shape ({self._mask.shape[0]}, 1), "
                             f"got {ids.shape}")
        if self._capacity is not None and self._mask.shape[1] >= self._capacity:
            raise RuntimeError(f"the cache is full ({self._capacity} positions): prefill with "
                               "a larger cache_length")
        return self._step(ids, np.concatenate([self._mask, np.ones_like(ids)], axis=1),
                          host_logits)

    def next_tokens(self, logits: np.ndarray | ort.OrtValue) -> np.ndarray:
        """Greedy choice (B, 1) int64 at the last position of ``logits`` (B, S, V); device
        logits are reduced on the device and only the ids are copied back."""
        if not isinstance(logits, np.ndarray) and self._argmax is None:
            logits = logits.numpy()
        if isinstance(logits, np.ndarray):
            return logits[:, -1].argmax(-1).reshape(-1, 1).astype(np.int64)
        binding = self._argmax_binding
        if logits is not self._argmax_bound:  # decode steps reuse one logits buffer
            binding.bind_ortvalue_input("logits", logits)
            binding.bind_output("next_ids", "cpu")
            self._argmax_bound = logits
        self._argmax.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def generate(self, prompt_ids: list[int] | np.ndarray, max_new_tokens: int,
                 eos_token_id: int | Iterable[int] | None = None,
                 stop: Callable[[list[int]], bool] | None = None,
                 pick: Callable[[np.ndarray], int] | None = None) -> list[int]:
        """Greedy decoding of one prompt, or sampling with ``pick``.

        Args:
            prompt_ids: token ids of the prompt, a list or a (S,) / (1, S) array.
            max_new_tokens: the most tokens to generate.
            eos_token_id: token id(s) that end generation; the eos token is returned.
            stop: called with the tokens generated so far after each one; True ends
                generation (the last token is kept).
            pick: chooses the next token from the last position's logits ``(V,)`` on the
                host (e.g. a :class:`quantcal.sampling.Sampler`); None: greedy, on the device.

        Returns:
            The generated token ids, without the prompt.
        """
        prompt = _as_ids(np.asarray(prompt_ids, dtype=np.int64).reshape(1, -1), "prompt_ids")
        eos = set() if eos_token_id is None else (
            {int(eos_token_id)} if np.isscalar(eos_token_id) else {int(t) for t in eos_token_id})
        tokens: list[int] = []
        if max_new_tokens <= 0:
            return tokens
        logits = self.prefill(prompt, host_logits=False, last_logits=True, cache_length=(
            prompt.shape[1] + max_new_tokens if self.shares_cache else None))
        if pick is None:
            for next_ids in self.greedy(logits, max_new_tokens):
                tokens.append(int(next_ids[0, 0]))
                if tokens[-1] in eos or (stop is not None and stop(tokens)):
                    break
            return tokens
        while True:
            host = logits if isinstance(logits, np.ndarray) else logits.numpy()
            next_ids = np.array([[pick(host[0, -1])]], dtype=np.int64)
            tokens.append(int(next_ids[0, 0]))
            if (tokens[-1] in eos or len(tokens) >= max_new_tokens
                    or (stop is not None and stop(tokens))):
                return tokens
            logits = self.decode_step(next_ids, host_logits=False)

    def greedy(self, logits: np.ndarray | ort.OrtValue, count: int) -> Iterator[np.ndarray]:
        """Greedy continuation of the current sequences: yields ``count`` arrays of next ids
        (B, 1), the first picked from ``logits`` (the prefill's), each later one after a
        decode step of the one before (``count - 1`` steps in all; stopping early leaves the
        cache holding the tokens yielded but the last)."""
        next_ids = self.next_tokens(logits)
        for i in range(count):
            yield next_ids
            if i + 1 < count:
                next_ids = self.next_tokens(self.decode_step(next_ids, host_logits=False))

    def _argmax_session(self) -> ort.InferenceSession | None:
        """The greedy argmax on the decoder's provider; None (argmax on the host) if the
        provider cannot run it whole."""
        options = ort.SessionOptions()
        options.log_severity_level = 4
        providers: list = ["CPUExecutionProvider"]
        if self.provider == "cuda":
            options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
            providers = [("CUDAExecutionProvider", {"device_id": str(self.device_id)})]
        try:
            return ort.InferenceSession(argmax_graph(self.spec.dtype), options,
                                        providers=providers)
        except Exception:  # onnxruntime's own exception types; the host argmax still works
            return None

    def _vocab(self) -> int:
        if self.spec.vocab_size is None:  # symbolic in the graph: read it off the prefill
            return self._binding.get_outputs()[0].shape()[-1]
        return self.spec.vocab_size

    def _new_cache(self, batch: int, length: int) -> list[ort.OrtValue]:
        """One (B, kv_heads, length, head_dim) tensor per cache input."""
        return [self._empty_past(batch, length) for _ in self.spec.past_names]

    def _empty_past(self, batch: int, length: int = 0) -> ort.OrtValue:
        """(B, kv_heads, length, head_dim), uninitialised: attention reads only the
        positions the mask says were written."""
        shape = [batch, self.spec.kv_heads, length, self.spec.head_dim]
        return ort.OrtValue.ortvalue_from_shape_and_type(shape, self.spec.dtype,
                                                         self.provider, self.device_id)

    def _step(self, ids: np.ndarray, mask: np.ndarray, host_logits: bool = True
              ) -> np.ndarray | ort.OrtValue:
        """Run ``ids`` (B, S) after the cache; ``mask`` (B, P+S). Returns the logits."""
        seq = ids.shape[1]
        positions = last_positions(mask, seq)
        binding = self._binding
        shared = self._capacity is not None
        first = not shared or seq == mask.shape[1]  # a shared cache is bound at prefill only
        if first:
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
        # host arrays: onnxruntime copies them to the device as part of the run (and reads
        # total_sequence_length on the host); rebinding a bound name replaces it
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions))
        if self._wants_total:
            binding.bind_cpu_input("total_sequence_length",
                                   np.array(mask.shape[1], dtype=np.int32))
        if first and self._takes_logits_from:
            binding.bind_cpu_input(LOGITS_FROM, self._logits_from)
        if first:
            binding.bind_output("logits", self.provider, self.device_id)  # output 0
            for name, value in zip(self.spec.past_names, self._cache):
                binding.bind_ortvalue_input(name, value)
            for name, value in zip(self.spec.present_names, self._cache):
                if shared:  # written in place: past and present are one buffer
                    binding.bind_ortvalue_output(name, value)
                else:
                    binding.bind_output(name, self.provider, self.device_id)
        elif self._step_logits is None:  # the first decode step of a shared cache
            self._step_logits = ort.OrtValue.ortvalue_from_shape_and_type(
                [ids.shape[0], 1, self._vocab()], self.spec.dtype, self.provider,
                self.device_id)
            binding.bind_ortvalue_output("logits", self._step_logits)
        self.session.run_with_iobinding(binding, self._run_options)
        if first:
            logits, *present = binding.get_outputs()  # in the order bound above
            if not shared:
                self._cache = list(present)
        else:  # decode with a shared cache: every output is a buffer we hold
            logits = self._step_logits
        self._mask = mask
        if not host_logits:
            return logits
        host = logits.numpy()  # a CPU buffer's numpy() is a view: copy the reused one
        return host.copy() if logits is self._step_logits else host
