"""Scoring backends: one interface over the HF torch model (FP reference or the plan's
fake-quant) and the exported ONNX decoder on onnxruntime, so the same task code drives both.

Follows lm-evaluation-harness's HF conventions: context and continuation are tokenized as
in its ``_encode_pair`` (trailing spaces of the context move to the continuation; no special
tokens unless asked), loglikelihood requests run longest first and are truncated from the
left, and generation is greedy up to a stop string, eos or the token limit. Reads a model
folder or hub id, a run directory (``run.json``, ``plan.json``, ``qparams.safetensors``,
``model.onnx``); writes nothing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import nn

from quantcal.errors import QuantcalError
from quantcal.export.positions import model_positions
from quantcal.models import config_or_none, hub_kwargs
from quantcal.provenance import verified_export
from quantcal.rundir import MODEL, QPARAMS, RUN_JSON, RunDir

DEFAULT_MAX_LENGTH = 2048
Scores = tuple[np.ndarray, np.ndarray]  # per row: log p of tokens 1..n-1 (n-1,), greedy hits


@runtime_checkable
class Backend(Protocol):
    """What a task needs from a model."""

    name: str
    tokenizer: object
    max_length: int

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """Per (context, continuation): sum of the continuation's log-probs, and whether
        greedy decoding would produce exactly the continuation's tokens."""
        ...

    def generate_until(self, requests: list[tuple[str, tuple[str, ...], int]]) -> list[str]:
        """Per (context, stop strings, max new tokens): the greedy continuation, cut before
        the first stop string."""
        ...

    def token_logprobs(self, input_ids: list[int]) -> np.ndarray:
        """``(n-1,)`` log p of tokens 1..n-1 of ``input_ids`` given their prefix."""
        ...


class _LmEvalBackend:
    """Tokenization, ordering, batching and stop strings shared by both backends; a
    subclass runs the model in ``_score_rows`` and ``_greedy``."""

    same_length_batches = False  # True: a batch holds rows of one length only (no padding)

    def __init__(self, tokenizer, *, batch_size: int, max_length: int,
                 eos_token_ids: Iterable[int] | None, add_bos_token: bool):
        if batch_size < 1:
            raise QuantcalError(f"batch size must be at least 1, got {batch_size}")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.add_bos_token = add_bos_token
        eos = [tokenizer.eos_token_id] if eos_token_ids is None else list(eos_token_ids)
        self.eos_token_ids = frozenset(int(t) for t in eos if t is not None)

    # -- subclass hooks ------------------------------------------------------------------
    def _score_rows(self, rows: list[list[int]]) -> list[Scores]:
        raise NotImplementedError

    def _greedy(self, prompt: list[int], max_new_tokens: int,
                stop: Callable[[list[int]], bool]) -> list[int]:
        raise NotImplementedError

    # -- tokenization (lm-eval's HFLM) ---------------------------------------------------
    def tok_encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=self.add_bos_token).input_ids)

    @property
    def prefix_token_id(self) -> int:
        """Stands in for an empty context (lm-eval: bos, else eos)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's ``_encode_pair``: continuation tokens are those of the whole text past
        the context's own tokens, after moving the context's trailing spaces over."""
        if context == "":
            return [self.prefix_token_id], self.tok_encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx):]

    # -- the interface -------------------------------------------------------------------
    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(c, x) for c, x in requests]
        # lm-eval's order: longest first, ties by tokens; feed at most max_length tokens
        rows = [(c + x)[-(self.max_length + 1):] for c, x in pairs]
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), tuple(rows[i])))
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        for batch in self._batches(order, rows):
            for i, (logp, hits) in zip(batch, self._score_rows([rows[i] for i in batch])):
                n = min(len(pairs[i][1]), len(logp))  # a left-truncated continuation
                results[i] = (float(np.sum(logp[len(logp) - n:], dtype=np.float64)),
                              bool(np.all(hits[len(hits) - n:])))
        return results  # type: ignore[return-value]

    def token_logprobs(self, input_ids: Sequence[int]) -> np.ndarray:
        ids = [int(t) for t in input_ids]
        if not 2 <= len(ids) <= self.max_length + 1:
            raise ValueError(f"token_logprobs needs 2..{self.max_length + 1} tokens "
                             f"(max_length + 1), got {len(ids)}")
        return self._score_rows([ids])[0][0]

    def generate_until(self, requests: list[tuple[str, tuple[str, ...], int]]) -> list[str]:
        return [self._generate_one(c, tuple(s), int(n)) for c, s, n in requests]

    def _generate_one(self, context: str, stops: tuple[str, ...], max_new_tokens: int) -> str:
        if max_new_tokens >= self.max_length:
            raise QuantcalError(f"max_new_tokens {max_new_tokens} leaves no room for the "
                                f"prompt in the model's {self.max_length} positions")
        stops = tuple(s for s in stops if s)
        prompt = self.tok_encode(context) or [self.prefix_token_id]
        prompt = prompt[-(self.max_length - max_new_tokens):]

        def stop(tokens: list[int]) -> bool:
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            return any(s in text for s in stops)

        tokens = self._greedy(prompt, max_new_tokens, stop)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for s in stops:
            text = text.split(s)[0]
        return text

    def _batches(self, order: list[int], rows: list[list[int]]) -> Iterable[list[int]]:
        batch: list[int] = []
        for i in order:
            if batch and (len(batch) == self.batch_size or (
                    self.same_length_batches and len(rows[i]) != len(rows[batch[0]]))):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch


class TorchBackend(_LmEvalBackend):
    """A HF causal LM on ``device``: right-padded batches, greedy decoding with HF's cache."""

    def __init__(self, model: nn.Module, tokenizer, device: torch.device | str, *,
                 batch_size: int = 8, max_length: int | None = None,
                 eos_token_ids: Iterable[int] | None = None, add_bos_token: bool = False,
                 name: str = "torch"):
        from quantcal.models import max_positions

        super().__init__(tokenizer, batch_size=batch_size,
                         max_length=max_length or max_positions(model) or DEFAULT_MAX_LENGTH,
                         eos_token_ids=eos_token_ids, add_bos_token=add_bos_token)
        self.model = model.eval()
        self.device = torch.device(device)
        self.name = name
        self._swaps = contextlib.ExitStack()

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, plan_run: RunDir | None = None,
                        **kwargs) -> "TorchBackend":
        """Load a model; with ``plan_run``, apply that run's plan as fake-quant for the
        backend's lifetime (until :meth:`close`)."""
        from quantcal.models import load_model

        # scoring needs any causal LM, not one quantcal can export; a plan needs its family
        model, tokenizer = load_model(name_or_path, dtype=dtype, device=device,
                                      check_family=plan_run is not None)
        kwargs.setdefault("eos_token_ids", eos_ids(tokenizer, name_or_path))
        kwargs.setdefault("name", "torch-fakequant" if plan_run else "torch")
        backend = cls(model, tokenizer, device, **kwargs)
        if plan_run is not None:
            backend._swaps.enter_context(_fake_quant(model, plan_run))
        return backend

    def close(self) -> None:
        """Put back the original modules a plan swapped out."""
        self._swaps.close()

    @torch.inference_mode()
    def _score_rows(self, rows: list[list[int]]) -> list[Scores]:
        width = max(len(r) for r in rows)
        # right padding needs no mask: a causal model's valid positions never see it
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
        ids = ids.to(self.device)
        logits = self.model(ids[:, :-1], use_cache=False).logits  # (B, W-1, V)
        targets = ids[:, 1:]  # (B, W-1)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]
        hits = logits.argmax(dim=-1) == targets
        logp, hits = logp.cpu().numpy(), hits.cpu().numpy()
        return [(logp[i, :len(r) - 1], hits[i, :len(r) - 1]) for i, r in enumerate(rows)]

    @torch.inference_mode()
    def _greedy(self, prompt: list[int], max_new_tokens: int,
                stop: Callable[[list[int]], bool]) -> list[int]:
        tokens: list[int] = []
        if max_new_tokens <= 0:
            return tokens
        out = self.model(torch.tensor([prompt], device=self.device), use_cache=True)
        while True:
            tokens.append(int(out.logits[0, -1].argmax()))
            if (tokens[-1] in self.eos_token_ids or len(tokens) >= max_new_tokens
                    or stop(tokens)):
                return tokens
            nxt = torch.tensor([[tokens[-1]]], device=self.device)
            out = self.model(nxt, past_key_values=out.past_key_values, use_cache=True)


class OnnxBackend(_LmEvalBackend):
    """An exported decoder through :class:`DecoderRunner`; a batch holds rows of one length
    (the runner's masks are full), scored from host logits in float32."""

    same_length_batches = True

    def __init__(self, path: str | Path, tokenizer, provider: str = "auto", *,
                 batch_size: int = 8, max_length: int | None = None,
                 eos_token_ids: Iterable[int] | None = None, add_bos_token: bool = False,
                 device_id: int = 0):
        from quantcal.runner import DecoderRunner
        from quantcal.session import make_session

        super().__init__(tokenizer, batch_size=batch_size,
                         max_length=max_length or DEFAULT_MAX_LENGTH,
                         eos_token_ids=eos_token_ids, add_bos_token=add_bos_token)
        self.path = Path(path)
        session, used = make_session(self.path, provider, device_id=device_id)
        self.runner = DecoderRunner(session, used)
        self.provider = used
        self.name = f"onnx-{used}"

    def _score_rows(self, rows: list[list[int]]) -> list[Scores]:
        ids = np.asarray(rows, dtype=np.int64)  # (B, S): one length per batch
        try:
            logits = np.asarray(self.runner.prefill(ids[:, :-1]), dtype=np.float32)
        finally:
            self.runner.reset()
        shifted = logits - logits.max(axis=-1, keepdims=True)  # (B, S-1, V)
        logz = np.log(np.exp(shifted).sum(axis=-1))
        targets = ids[:, 1:, None]
        logp = np.take_along_axis(shifted, targets, axis=-1)[..., 0] - logz
        hits = logits.argmax(axis=-1) == ids[:, 1:]
        return [(logp[i], hits[i]) for i in range(len(rows))]

    def _greedy(self, prompt: list[int], max_new_tokens: int,
                stop: Callable[[list[int]], bool]) -> list[int]:
        try:
            return self.runner.generate(prompt, max_new_tokens,
                                        eos_token_id=self.eos_token_ids, stop=stop)
        finally:
            self.runner.reset()


@contextlib.contextmanager
def _fake_quant(model: nn.Module, run: RunDir):
    """Swap in the run plan's fake-quant modules while the context is open."""
    from quantcal.calibrate.awq import apply_awq_
    from quantcal.fakequant import fake_quant_modules, swapped
    from quantcal.models import quantizable_layers
    from quantcal.plancheck import resolved_formats

    record = run.read_run()
    if set(record.layers) != set(quantizable_layers(model)):
        raise QuantcalError(f"{run.path} was calibrated on {record.config.model}, whose "
                            "layers differ from this model's; pass that model or its run")
    qparams, meta = run.load_tensors(QPARAMS, "qparams")
    formats = resolved_formats(run.read_plan(), record, meta.get("formats", "").split(","))
    apply_awq_(model, qparams)  # a --awq run quantized the scaled model (a no-op otherwise)
    with swapped(model, fake_quant_modules(model, formats, qparams)):
        yield model


def eos_ids(tokenizer, source: str | None) -> list[int]:
    """The tokenizer's eos plus any the model's generation config names (Llama 3 has two)."""
    ids = [tokenizer.eos_token_id]
    if source:
        from transformers import GenerationConfig

        with contextlib.suppress(OSError, ValueError):
            extra = GenerationConfig.from_pretrained(source, **hub_kwargs(source)).eos_token_id
            ids += extra if isinstance(extra, list) else [extra]
    return sorted({int(t) for t in ids if t is not None})


def _context_length(source: str) -> int | None:
    cfg = config_or_none(source)
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def _tokenizer_source(onnx_path: Path, run: RunDir) -> str:
    """The folder beside the model if it holds a tokenizer, else the model of the run.json
    beside it, else the model of ``run``."""
    folder = onnx_path.parent
    if _has_tokenizer(folder):
        return str(folder)
    for candidate in (RunDir(folder), run):
        if candidate.has(RUN_JSON):
            return candidate.read_run().config.model
    raise QuantcalError(f"no tokenizer for {onnx_path}: put one beside it, or pass --run "
                        "DIR of the run it was exported from (its run.json names the model)")


def _onnx_path(model: str | None, run: RunDir) -> Path | None:
    """The ONNX file ``model`` means, or None when it means a torch model."""
    if model is None:
        return run.require(MODEL)
    path = Path(model).expanduser()
    if path.suffix == ".onnx":
        if not path.is_file():
            raise QuantcalError(f"model file not found: {path}; pass an exported model.onnx")
        return path
    if path.is_dir() and (path / MODEL).is_file():
        return path / MODEL
    if path.is_dir() and (path / RUN_JSON).is_file():
        raise QuantcalError(f"{path} is a run directory without {MODEL}; run "
                            f"`quantcal export --run {path}` first")
    return None


def make_backend(model: str | None, run: RunDir, *, provider: str = "auto",
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int = 8, fake_quant: bool = False) -> Backend:
    """The backend ``model`` names.

    Args:
        model: a HF id or folder (torch), a ``.onnx`` file or a folder holding
            ``model.onnx`` (onnxruntime), or None for ``run``'s ``model.onnx``.
        run: the run directory (its ``run.json`` names the tokenizer of an ONNX model; its
            plan is applied to a torch model when ``fake_quant``).
        provider: onnxruntime provider, ``auto``, ``cuda`` or ``cpu``.
        device, dtype: where and how a torch model runs.
        fake_quant: apply ``run``'s plan as fake-quant to a torch model.
    """
    path = _onnx_path(model, run)
    if path is None:
        return TorchBackend.from_pretrained(model, device, dtype,
                                            plan_run=run if fake_quant else None,
                                            batch_size=batch_size)
    if fake_quant:
        raise QuantcalError("fake-quant applies to a torch model; an exported ONNX model "
                            "already holds its plan - drop the fake-quant option")
    verified_export(path)
    from transformers import AutoTokenizer

    source = _tokenizer_source(path, run)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs(source))
    except (OSError, ValueError) as exc:
        raise QuantcalError(f"could not load the tokenizer from {source!r} ({exc}); put "
                            "the tokenizer beside the model") from None
    # the graph's own position limit first: a tokenizer folder beside the model (as the
    # onnxruntime-genai files put there) has no config.json to read it from
    limits = [n for n in (model_positions(path), _context_length(source)) if n]
    return OnnxBackend(path, tokenizer, provider, batch_size=batch_size,
                       max_length=min(limits, default=None),
                       eos_token_ids=eos_ids(tokenizer, source))
