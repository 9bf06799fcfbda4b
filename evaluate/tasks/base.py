"""The vocabulary every task shares: the requests a scoring backend answers, the metric
type, the task protocol, averages with their standard error, document selection and
lm-eval's few-shot exemplar draw.

Pure data and arithmetic; reads and writes nothing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from quantcal.errors import QuantcalError


@dataclass(frozen=True)
class LoglikelihoodRequest:
    """log P(continuation | context), summed over the continuation's tokens."""
    context: str
    continuation: str


@dataclass(frozen=True)
class GenerateRequest:
    """Greedy text after ``context``, stopped at any of ``until`` or ``max_new_tokens``."""
    context: str
    until: tuple[str, ...]
    max_new_tokens: int


@dataclass(frozen=True)
class PerplexityWindow:
    """One model input; tokens at positions >= ``score_from`` are each scored from the
    tokens before them (``score_from >= 1``)."""
    input_ids: list[int]
    score_from: int

    @property
    def n_scored(self) -> int:
        return len(self.input_ids) - self.score_from


Request = LoglikelihoodRequest | GenerateRequest | PerplexityWindow


class Metric(NamedTuple):
    value: float
    stderr: float | None  # None where no standard error is defined (perplexity)


class Task(Protocol):
    name: str

    def load(self, data_dir: Path | None = None, *, limit: int | None = None,
             sample: int | None = None, seed: int = 1234, tokenizer: Any = None) -> list: ...
    def requests(self, doc) -> list[Request]: ...
    def score(self, doc, responses: Sequence) -> dict[str, float]: ...
    def aggregate(self, per_doc: Sequence[Mapping[str, float]]) -> dict[str, Metric]: ...


def mean_stderr(values: Sequence[float]) -> Metric:
    """Mean and its standard error, sample std (ddof=1) / sqrt(n), as lm-eval's mean_stderr."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to average")
    mean = math.fsum(values) / n
    if n < 2:
        return Metric(mean, None)
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return Metric(mean, math.sqrt(var / n))


def mean_metrics(per_doc: Sequence[Mapping[str, float]]) -> dict[str, Metric]:
    """Each per-document metric averaged over documents, with its standard error."""
    if not per_doc:
        raise ValueError("no documents were scored")
    return {k: mean_stderr([d[k] for d in per_doc]) for k in per_doc[0]}


def select(docs: Sequence, limit: int | None = None, sample: int | None = None,
           seed: int = 1234) -> list:
    """The first ``limit`` docs, or ``sample`` docs drawn by ``random.Random(seed)`` over the
    indices and kept in their original order, or all of them."""
    if limit is not None and sample is not None:
        raise QuantcalError("pass --limit or --sample, not both")
    for flag, value in (("--limit", limit), ("--sample", sample)):
        if value is not None and value < 1:
            raise QuantcalError(f"{flag} must be at least 1, got {value}")
    if limit is not None:
        return list(docs[:limit])
    if sample is not None and sample < len(docs):
        return [docs[i] for i in sorted(random.Random(seed).sample(range(len(docs)), sample))]
    return list(docs)


def draw_shots(docs: Sequence[Mapping], pool: Sequence[Mapping], *, num_fewshot: int = 5,
               seed: int = 1234, same_split: bool = False) -> list[tuple[int, ...]]:
    """Exemplar indices into ``pool`` for each of ``docs``, by lm-eval's ContextSampler: one
    ``random.Random(seed)`` for the whole split, walked in document order; per document draw
    ``rnd.sample(pool, n)`` with n = num_fewshot + 1 if the pool is the evaluated split
    itself, else num_fewshot (lm-eval's rule; GSM8K draws 5 from train), drop exemplars
    equal to the document (as rows), keep the first ``num_fewshot``."""
    rnd = random.Random(seed)
    n = num_fewshot + 1 if same_split else num_fewshot
    out = []
    for doc in docs:
        drawn = rnd.sample(range(len(pool)), n)
        out.append(tuple(i for i in drawn if pool[i] != doc)[:num_fewshot])
    return out
