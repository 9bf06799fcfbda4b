"""GSM8K test, 5-shot from train, as lm-evaluation-harness's ``gsm8k`` task (not the CoT
variant): the few-shot sampler, the prompt, the strict-match and flexible-extract filters
and exact match after lm-eval's normalisation.

Reads both splits through :mod:`.data`; writes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .base import GenerateRequest, draw_shots, mean_metrics, select
from .data import Source, load_rows


STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")  # lm-eval's regexes_to_ignore, in order
INVALID = "[invalid]"  # lm-eval's regex-filter fallback


def regex_extract(pattern: re.Pattern, text: str, group_select: int = 0) -> str:
    """lm-eval's RegexFilter: the ``group_select``-th match; of a match with several
    groups, the first non-empty one; stripped; ``[invalid]`` when nothing matches."""
    matches = pattern.findall(text)
    if not matches:
        return INVALID
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((g for g in match if g), INVALID)
    return match.strip()


def normalize_answer(text: str) -> str:
    """lm-eval's exact_match normalisation for gsm8k: regexes_to_ignore, then lower case."""
    for pattern in IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


@dataclass(frozen=True)
class Gsm8kDoc:
    question: str
    answer: str  # full solution, ending in "#### <number>"
    shots: tuple[tuple[str, str], ...] = ()  # (question, answer) exemplars, in prompt order


def gsm8k_prompt(doc: Gsm8kDoc) -> str:
    """Exemplars as "Question: q\\nAnswer: a" joined by blank lines, then the question."""
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in doc.shots)
    return f"{shots}Question: {doc.question}\nAnswer:"


def _hub_gsm8k(split: str) -> Mapping[str, Any]:
    return {"path": "openai/gsm8k", "name": "main", "split": split}


@dataclass(frozen=True)
class GSM8K:
    """GSM8K test, 5-shot from train (lm-eval ``gsm8k``): exact match after the
    strict-match and flexible-extract filters."""
    name: str = "gsm8k"
    num_fewshot: int = 5
    fewshot_seed: int = 1234
    max_new_tokens: int = 256
    until: tuple[str, ...] = ("Question:", "</s>", "<|im_end|>")
    test: Source = Source("gsm8k test", ("gsm8k/test.jsonl",), _hub_gsm8k("test"))
    train: Source = Source("gsm8k train", ("gsm8k/train.jsonl",), _hub_gsm8k("train"))

    def load(self, data_dir=None, *, limit=None, sample=None, seed=1234, tokenizer=None):
        """Exemplars are drawn for the whole test split before ``limit``/``sample`` pick
        documents, so each document's prompt is the one a full lm-eval run gives it."""
        rows = load_rows(self.test, data_dir)
        pool = load_rows(self.train, data_dir) if self.num_fewshot else []
        shots = draw_shots(rows, pool, num_fewshot=self.num_fewshot, seed=self.fewshot_seed)
        docs = [Gsm8kDoc(r["question"], r["answer"],
                         tuple((pool[i]["question"], pool[i]["answer"]) for i in idx))
                for r, idx in zip(rows, shots)]
        return select(docs, limit, sample, seed)

    def requests(self, doc: Gsm8kDoc) -> list[GenerateRequest]:
        return [GenerateRequest(gsm8k_prompt(doc), self.until, self.max_new_tokens)]

    def score(self, doc: Gsm8kDoc, responses: Sequence[str]) -> dict[str, float]:
        """``responses``: the one generated text (cut here too at the first stop string)."""
        (text,) = responses
        cut = min((i for i in (text.find(s) for s in self.until) if i >= 0), default=-1)
        text = text[:cut] if cut >= 0 else text
        gold = normalize_answer(doc.answer)
        strict = regex_extract(STRICT, text)
        flexible = regex_extract(FLEXIBLE, text, group_select=-1)
        return {"exact_match_strict": float(normalize_answer(strict) == gold),
                "exact_match_flexible": float(normalize_answer(flexible) == gold)}

    def aggregate(self, per_doc):
        return mean_metrics(per_doc)

    def protocol(self, docs: Sequence[Gsm8kDoc]) -> str:
        """How ``docs`` were built: lm-eval's ``gsm8k`` prompt, or how this one differs."""
        if self.num_fewshot == 5 and self.fewshot_seed == 1234:
            return "lm-eval"
        return f"lm-eval-like: {self.num_fewshot}-shot, fewshot seed {self.fewshot_seed}"
