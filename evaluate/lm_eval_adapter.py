"""lm-evaluation-harness model ``quantcal``: lm-eval's own tasks scored by quantcal's backends.

``QuantcalLM`` answers lm-eval's three request types with :mod:`.backends` (the HF torch
model, optionally with a run's plan as fake-quant, or the exported ONNX decoder on
onnxruntime), so any lm-eval task runs on a quantized export, and lm-eval's ``hellaswag``
and ``gsm8k`` give the numbers ``quantcal eval`` gives on the same documents:

- ``loglikelihood``: every request in one call to the backend, which orders them longest
  first and scores them in batches of ``batch_size`` (lm-eval's ``_encode_pair``);
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_length`` tokens
  after the prefix token, each scored with the backend's ``token_logprobs``;
- ``generate_until``: greedy decoding to a stop string, eos or ``max_gen_toks`` (256 by
  default, as lm-eval), one request at a time as ``quantcal eval`` decodes; sampling is
  refused.

Importing this module registers the name (lm-eval 0.4.x reads no plugin entry points, so
``lm_eval --model quantcal`` needs it imported first: ``quantcal-lm-eval`` does that, see
:mod:`.lm_eval_cli`). Model arguments (``--model_args k=v,...``): ``path`` (a run
directory or ``.onnx`` file, or a HF id or folder for torch; ``pretrained`` is an alias),
``provider`` (auto, cuda, cpu), ``device`` (torch; lm-eval's ``--device``, else cuda when
``provider=cuda``, else cpu), ``dtype`` (torch: float32, float16, bfloat16), ``batch_size``
(lm-eval's ``--batch_size``), ``run`` (the run directory whose run.json names an ONNX
model's tokenizer, or whose plan ``fake_quant=True`` applies to a torch model). Reads the
model and run directory; writes nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lm_eval.models  # noqa: F401  lm-eval fills its registry only while it is empty
import numpy as np
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from quantcal.errors import QuantcalError
from quantcal.evaluate.backends import make_backend
from quantcal.rundir import DEFAULT_RUN_DIR, RunDir
from quantcal.session import PROVIDERS

MODEL_NAME = "quantcal"
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default when a task names none
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MAX_TOKENS_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")

log = logging.getLogger(__name__)


def _batch_size(value) -> int:
    """lm-eval passes ``--batch_size`` as given (``8``, ``"8"``, ``"auto"``)."""
    text = str(value)
    if not text.isdigit() or int(text) < 1:
        raise QuantcalError(f"batch_size must be a whole number of at least 1 for the "
                            f"quantcal model, got {value!r}; pass e.g. --batch_size 8")
    return int(text)


def _dtype(name) -> torch.dtype:
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise QuantcalError(f"unknown dtype {name!r} for the quantcal model; use one of "
                            f"{', '.join(DTYPES)}") from None


def _device(device, provider: str) -> str:
    """The torch device: ``device``, else cuda when ``provider`` is cuda, else cpu; cpu (with
    a warning) for cuda on a machine without CUDA, as lm-eval's HF model does, since
    lm-eval's command line passes ``--device cuda:0`` unless told otherwise."""
    if provider not in PROVIDERS:
        raise QuantcalError(f"unknown provider {provider!r} for the quantcal model; use one "
                            f"of {', '.join(PROVIDERS)}")
    device = str(device) if device is not None else ("cuda" if provider == "cuda" else "cpu")
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise QuantcalError(f"unknown device {device!r} for the quantcal model; use cpu, "
                            "cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        log.warning("device %s: no CUDA device here; a torch model runs on cpu", device)
        return "cpu"
    return device


def _run_dir(path: str, run) -> RunDir:
    """``run`` if given, else the folder of ``path`` (the run directory beside an export)."""
    if run is not None:
        return RunDir(str(run))
    local = Path(path).expanduser()
    if local.is_dir():
        return RunDir(local)
    return RunDir(local.parent if local.suffix == ".onnx" else DEFAULT_RUN_DIR)


def greedy_settings(gen_kwargs: dict) -> tuple[tuple[str, ...], int]:
    """Stop strings and token limit of one lm-eval ``generate_until`` request.

    Raises:
        QuantcalError: the task asks for sampling (quantcal decodes greedily only).
    """
    kwargs = dict(gen_kwargs or {})
    if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
        raise QuantcalError("the quantcal model decodes greedily only; this task asks for "
                            f"sampling ({kwargs}); pass --gen_kwargs do_sample=False,"
                            "temperature=0")
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    limit = next((kwargs[k] for k in _MAX_TOKENS_KEYS if kwargs.get(k) is not None),
                 DEFAULT_MAX_GEN_TOKS)
    return tuple(str(s) for s in until), int(limit)


@register_model(MODEL_NAME)
class QuantcalLM(LM):
    """lm-eval's ``LM`` over a quantcal backend (torch or onnxruntime)."""

    def __init__(self, path: str | None = None, *, pretrained: str | None = None,
                 provider: str = "auto", device: str | None = None, dtype: str = "float32",
                 batch_size: int | str = 8, max_batch_size: int | None = None,
                 run: str | None = None, fake_quant: bool = False, **unknown):
        """Open the backend ``path`` names (see the module docstring for the arguments;
        ``max_batch_size``, lm-eval's ``auto`` batch limit, is accepted and unused)."""
        super().__init__()
        if unknown:
            raise QuantcalError(f"the quantcal model has no argument "
                                f"{', '.join(sorted(unknown))}; it takes path, provider, "
                                "device, dtype, batch_size, run, fake_quant")
        if (path is None) == (pretrained is None):
            raise QuantcalError("pass the model as --model_args path=RUN_DIR_OR_ONNX (or "
                                "pretrained=...), exactly once")
        path = str(path if path is not None else pretrained)
        self.path = path
        self.backend = make_backend(path, _run_dir(path, run), provider=str(provider),
                                    device=_device(device, str(provider)),
                                    dtype=_dtype(dtype), batch_size=_batch_size(batch_size),
                                    fake_quant=bool(fake_quant))
        self._device = getattr(self.backend, "device", None)
        log.info("quantcal model %s on %s", path, self.backend.name)

    # -- lm-eval's request types -----------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` per ``(context, continuation)``."""
        pairs = [tuple(r.args) for r in requests]
        results = self.backend.loglikelihood(pairs) if pairs else []
        for pair, result in zip(pairs, results):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Summed log-likelihood of each whole string, lm-eval's rolling windows."""
        out = []
        for request in tqdm(requests, desc="quantcal loglikelihood_rolling",
                            disable=disable_tqdm or len(requests) < 2):
            (text,) = request.args
            total = self._rolling(self.backend.tok_encode(text))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def _rolling(self, tokens: list[int]) -> float:
        windows = map(make_disjoint_window, get_rolling_token_windows(
            token_list=tokens, prefix_token=self.backend.prefix_token_id,
            max_seq_len=self.backend.max_length, context_len=1))
        total = 0.0
        for context, target in windows:
            logp = self.backend.token_logprobs(context + target)  # (len - 1,)
            total += float(np.sum(logp[len(logp) - len(target):], dtype=np.float64))
        return total

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy text after each context, cut before the first stop string."""
        out = []
        for request in tqdm(requests, desc="quantcal generate_until",
                            disable=disable_tqdm or len(requests) < 2):
            context, gen_kwargs = request.args
            until, limit = greedy_settings(gen_kwargs)
            (text,) = self.backend.generate_until([(context, until, limit)])
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    # -- chat templates and what lm-eval records ---------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.backend.tokenizer, "name_or_path", "")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return ""
        return getattr(self.backend.tokenizer, "chat_template", None)

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        if not getattr(self.backend.tokenizer, "chat_template", None):
            raise QuantcalError(f"the tokenizer of {self.path} has no chat template; drop "
                                "--apply_chat_template")
        return self.backend.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict[str, str]:
        """What lm-eval's results record about the model."""
        return {"quantcal_model": self.path, "quantcal_backend": self.backend.name}
