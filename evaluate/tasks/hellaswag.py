"""HellaSwag validation, 0-shot by default, as lm-evaluation-harness's ``hellaswag`` task:
the WikiHow cleanup, one log-likelihood request per ending, acc and acc_norm. With
``num_fewshot`` n, each query follows n exemplars from the train split, drawn and written as
lm-eval does (its ContextSampler seeded 1234; "query gold-ending" joined by blank lines).

Rows with the hub's fields (``Rowan/hellaswag``: ``ctx_a``, ``ctx_b``) are built exactly as
lm-eval's ``process_docs``. The local llama.cpp-derived file holds ``ctx`` only, so
``ctx_b`` cannot be capitalised: those documents are "lm-eval-like" (same cleanup and
scoring, the query's last fragment left in lower case) and :meth:`HellaSwag.protocol` says
so, for ``eval.json`` and the report.

Reads the split through :mod:`.data`; writes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .base import LoglikelihoodRequest, draw_shots, mean_metrics, select
from .data import Source, load_rows


def preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleanup of WikiHow artefacts ([title], [header], [step], ...)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


@dataclass(frozen=True)
class HellaswagDoc:
    query: str
    choices: tuple[str, ...]
    gold: int
    exact: bool = True  # False: no ctx_a/ctx_b, so ctx_b is not capitalised (lm-eval-like)
    shots: tuple[tuple[str, str], ...] = ()  # (query, gold ending) exemplars, in prompt order


def hellaswag_doc(row: Mapping[str, Any]) -> HellaswagDoc:
    """A document from a hub/original row (``ctx_a``, ``ctx_b``: lm-eval's process_docs,
    character for character) or from the llama.cpp-derived local row (``ctx`` = ``ctx_a +
    " " + ctx_b`` with ``ctx_b`` not capitalised: the same cleanup of the whole, so only that
    capital differs from lm-eval; ``exact`` is False)."""
    if "ctx_a" in row:
        ctx, exact = row["ctx_a"] + " " + row["ctx_b"].capitalize(), True
    else:
        ctx, exact = row["ctx"], False
    return HellaswagDoc(preprocess(row["activity_label"] + ": " + ctx),
                        tuple(preprocess(e) for e in row["endings"]), int(row["label"]), exact)


LM_EVAL = "lm-eval"
LM_EVAL_LIKE = ("lm-eval-like: local file without ctx_a/ctx_b, so ctx_b is not capitalised "
                "as lm-eval does")


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # first of ties, as np.argmax


@dataclass(frozen=True)
class HellaSwag:
    """HellaSwag validation, 0-shot (or ``num_fewshot`` from train): acc and acc_norm
    (log-likelihood over characters)."""
    name: str = "hellaswag"
    num_fewshot: int = 0
    fewshot_seed: int = 1234
    source: Source = Source("hellaswag", ("hellaswag/hellaswag_val.jsonl",
                                          "hellaswag/hellaswag_val.llamacpp_derived.jsonl.gz"),
                            {"path": "Rowan/hellaswag", "split": "validation"})
    train: Source = Source("hellaswag train", ("hellaswag/hellaswag_train.jsonl",
                                               "hellaswag/hellaswag_train.jsonl.gz"),
                           {"path": "Rowan/hellaswag", "split": "train"})

    def load(self, data_dir=None, *, limit=None, sample=None, seed=1234, tokenizer=None):
        """Exemplars are drawn for the whole split before ``limit``/``sample`` pick
        documents, so each prompt is the one a full lm-eval run gives it."""
        rows = load_rows(self.source, data_dir)
        docs = [hellaswag_doc(r) for r in rows]
        if self.num_fewshot:
            pool = load_rows(self.train, data_dir)
            shots = [hellaswag_doc(r) for r in pool]
            drawn = draw_shots(rows, pool, num_fewshot=self.num_fewshot,
                               seed=self.fewshot_seed)
            docs = [replace(d, shots=tuple((shots[i].query, shots[i].choices[shots[i].gold])
                                           for i in idx)) for d, idx in zip(docs, drawn)]
        return select(docs, limit, sample, seed)

    def requests(self, doc: HellaswagDoc) -> list[LoglikelihoodRequest]:
        shots = "".join(f"{q} {a}\n\n" for q, a in doc.shots)
        return [LoglikelihoodRequest(shots + doc.query, " " + c) for c in doc.choices]

    def score(self, doc: HellaswagDoc, responses: Sequence) -> dict[str, float]:
        """``responses``: one ``(logprob, is_greedy)`` per choice. acc_norm divides each
        logprob by the choice's length in characters, without the leading space, exactly
        as lm-eval (``len(doc_to_choice(doc)[i])``)."""
        if len(responses) != len(doc.choices):
            raise ValueError(f"{len(responses)} responses for {len(doc.choices)} choices")
        lls = [float(r[0]) for r in responses]
        normed = [ll / max(len(c), 1) for ll, c in zip(lls, doc.choices)]
        return {"acc": float(_argmax(lls) == doc.gold),
                "acc_norm": float(_argmax(normed) == doc.gold)}

    def aggregate(self, per_doc):
        return mean_metrics(per_doc)

    def protocol(self, docs: Sequence[HellaswagDoc]) -> str:
        """How ``docs`` were built: "lm-eval", or "lm-eval-like: ..." if any was not (and
        the number of exemplars when there are some)."""
        shots = f" ({self.num_fewshot}-shot from train)" if self.num_fewshot else ""
        return (LM_EVAL if all(d.exact for d in docs) else LM_EVAL_LIKE) + shots
