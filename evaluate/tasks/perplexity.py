"""Perplexity of a corpus (WikiText-2 test, a C4 validation sample) over sliding token
windows, the Hugging Face "perplexity of fixed-length models" recipe.

Reads the corpus through :mod:`quantcal.textdata`, the layer calibration shares, and
tokenises it with the caller's tokenizer; writes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from quantcal.errors import QuantcalError
from quantcal.textdata import EVALUATION, open_corpus

from .base import Metric, PerplexityWindow, select
from .data import Source


def sliding_windows(ids: Sequence[int], seq_len: int, stride: int) -> list[PerplexityWindow]:
    """HF's "perplexity of fixed-length models" windows: one every ``stride`` tokens, at most
    ``seq_len`` long, each scoring only the tokens the previous windows did not (at least
    from its second token on, since the first has nothing before it). With ``stride <
    seq_len`` every token after the first is scored exactly once; with ``stride ==
    seq_len`` (disjoint windows) each window's first token goes unscored."""
    if seq_len < 2 or not 1 <= stride <= seq_len:
        raise QuantcalError(f"need seq_len >= 2 and 1 <= stride <= seq_len, got seq_len "
                            f"{seq_len}, stride {stride}")
    windows, prev_end = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + seq_len, len(ids))
        score_from = max(prev_end - begin, 1)
        if end - begin > score_from:
            windows.append(PerplexityWindow(list(ids[begin:end]), score_from))
        prev_end = end
        if end == len(ids):
            break
    return windows


@dataclass(frozen=True)
class Perplexity:
    """Perplexity of one corpus: its evaluation documents joined by blank lines (WikiText-2
    is one document, its rows so joined; ``source`` only labels it), tokenised once (with
    the tokenizer's special tokens, as the HF and GPTQ recipes do) and cut into windows. Its
    documents are the windows, so ``limit``/``sample`` pick windows."""
    name: str
    source: Source
    seq_len: int = 2048
    stride: int = 2048

    def __post_init__(self) -> None:
        sliding_windows([], self.seq_len, self.stride)  # validates the pair

    def load(self, data_dir=None, *, limit=None, sample=None, seed=1234, tokenizer=None):
        if tokenizer is None:
            raise ValueError(f"{self.name} needs a tokenizer to cut token windows")
        text = "\n\n".join(self.documents(data_dir))
        ids = tokenizer(text)["input_ids"]
        return select(sliding_windows(ids, self.seq_len, self.stride), limit, sample, seed)

    def documents(self, data_dir=None) -> list[str]:
        """The corpus's evaluation documents from :mod:`quantcal.textdata` (the second half
        of a local C4 sample; WikiText-2 test as one document, the hub's rows joined)."""
        _, docs = open_corpus(self.name, EVALUATION, data_dir, remedy="pass --data-dir DIR")
        return list(docs)

    def protocol(self, docs: Sequence[PerplexityWindow]) -> str:
        """What eval.json records of how the figure was made."""
        return f"perplexity over {len(docs)} windows; standard error: {STDERR_METHOD}"

    def requests(self, doc: PerplexityWindow) -> list[PerplexityWindow]:
        return [doc]

    def score(self, doc: PerplexityWindow, responses: Sequence[float]) -> dict[str, float]:
        """``responses``: the window's summed negative log-likelihood in nats."""
        (nll,) = responses
        return {"nll": float(nll), "tokens": float(doc.n_scored)}

    def aggregate(self, per_doc):
        """Perplexity ``exp(sum nll / sum tokens)`` with its standard error by the delta
        method (:func:`nll_stderr`; ``STDERR_METHOD``), None for a single window."""
        nll = math.fsum(d["nll"] for d in per_doc)
        tokens = math.fsum(d["tokens"] for d in per_doc)
        if tokens == 0:
            raise ValueError("no tokens were scored")
        mean = nll / tokens
        se = nll_stderr([d["nll"] for d in per_doc], [d["tokens"] for d in per_doc])
        ppl = math.exp(mean)
        return {"perplexity": Metric(ppl, None if se is None else ppl * se),
                "nll_per_token": Metric(mean, se),
                "scored_tokens": Metric(tokens, None)}


STDERR_METHOD = ("delta method over windows: the per-token NLL is a ratio of the windows' "
                 "summed NLL to their scored tokens, its variance estimated from the "
                 "windows' residuals (windows as independent clusters, tokens within a "
                 "window correlated); perplexity stderr = perplexity x NLL stderr")


def nll_stderr(nll: Sequence[float], tokens: Sequence[float]) -> float | None:
    """Standard error of ``R = sum(nll) / sum(tokens)`` over windows ``i`` (nats/token):
    ``sqrt(n / (n - 1) * sum((nll_i - R tokens_i)^2)) / sum(tokens)``, the linearised
    (delta-method) ratio estimator; with equal windows it is the standard error of the
    windows' mean NLL per token. None for fewer than two windows."""
    n = len(nll)
    if n < 2:
        return None
    total = math.fsum(tokens)
    ratio = math.fsum(nll) / total
    resid = math.fsum((y - ratio * x) ** 2 for y, x in zip(nll, tokens))
    return math.sqrt(n / (n - 1) * resid) / total


WIKITEXT2 = Source("wikitext2 test", ("wikitext2/wiki.test.raw",),
                   {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "test"})
C4 = Source("c4 validation", ("c4/c4_validation_2k.jsonl.gz", "c4/c4_validation_2k.parquet"),
            {"path": "allenai/c4", "split": "validation",
             "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}},
            stream_rows=2000)  # the first 2000 documents: as many as the local sample holds
