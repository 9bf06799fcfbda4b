"""``quantcal generate``: text from an exported model, through the session factory and the
KV-cache runner: greedy by default, or sampled (:mod:`quantcal.sampling`); the prompt as
given, or (``chat``) wrapped in the tokenizer's chat template as one user message. The
tokenizer comes from the run's model (``run.json``) unless a tokenizer folder or id is
given."""

from __future__ import annotations

import time
from pathlib import Path

from quantcal.errors import QuantcalError
from quantcal.export.positions import check_fits
from quantcal.graphrunner import decoding_runner
from quantcal.models import hub_kwargs
from quantcal.provenance import verified_export
from quantcal.rundir import MODEL, RunDir
from quantcal.sampling import Sampler, Sampling


def prompt_text(tok, prompt: str, chat: bool) -> str:
    """``prompt`` itself, or with ``chat`` the tokenizer's chat template applied to it as
    one user message, ending where the assistant's reply begins."""
    if not chat:
        return prompt
    if not getattr(tok, "chat_template", None):
        raise QuantcalError("--chat: this tokenizer has no chat template (an Instruct or "
                            "chat model's tokenizer has one); drop --chat or pass "
                            "--tokenizer DIR of a chat model")
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)


def generate_text(run: RunDir, prompt: str, *, model_path: Path | None = None,
                  tokenizer: str | None = None, max_new_tokens: int = 64,
                  provider: str = "auto", chat: bool = False,
                  sampling: Sampling = Sampling()) -> tuple[str, dict[str, float]]:
    """The completion of ``prompt`` (with ``chat``: the reply to it) and figures (provider,
    tokens, tokens/s)."""
    from transformers import AutoTokenizer

    path = Path(model_path) if model_path else run.require(MODEL)
    verified_export(path)
    source = tokenizer or run.read_run().config.model
    try:
        tok = AutoTokenizer.from_pretrained(source, **hub_kwargs(source))
    except (OSError, ValueError) as exc:
        raise QuantcalError(f"could not load the tokenizer from {source!r} ({exc}); pass "
                            "--tokenizer DIR") from None
    if not prompt:
        raise QuantcalError("the prompt is empty; pass --prompt TEXT")
    # the template writes its own special tokens (BOS included); a plain prompt gets none
    ids = tok(prompt_text(tok, prompt, chat), add_special_tokens=False).input_ids
    if not ids:
        raise QuantcalError("the prompt is empty; pass --prompt TEXT")
    if max_new_tokens < 1:
        raise QuantcalError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    check_fits(path, len(ids) + max_new_tokens,
               f"a {len(ids)}-token prompt and --max-new-tokens {max_new_tokens}",
               lambda limit: f"pass --max-new-tokens {max(limit - len(ids), 0)} or less"
               + ("" if limit > len(ids) else " with a shorter --prompt"))
    runner = decoding_runner(path, provider)  # CUDA graphs for decoding where they apply
    t = time.perf_counter()
    new = runner.generate(ids, max_new_tokens, eos_token_id=tok.eos_token_id,
                          pick=None if sampling.greedy else Sampler(sampling))
    seconds = time.perf_counter() - t
    return tok.decode(new, skip_special_tokens=True), {
        "provider": runner.provider, "prompt_tokens": len(ids), "new_tokens": len(new),
        "tokens_per_s": len(new) / max(seconds, 1e-9)}
