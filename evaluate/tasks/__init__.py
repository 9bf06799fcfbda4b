"""Evaluation tasks: HellaSwag (0-shot), GSM8K (5-shot) (``num_fewshot`` changes either) and
perplexity on WikiText-2 and C4, built the lm-evaluation-harness way so accuracies compare
with published numbers.

Owns the task names (``TASKS``, :func:`get_task`). Each task reads its documents from a
local folder laid out like ``shared/data`` (``data_dir``, else ``$QUANTCAL_DATA_DIR``), else
from the Hugging Face hub; nothing is written. A driver runs every task the same way::

    docs = task.load(data_dir, limit=..., sample=..., seed=..., tokenizer=...)
    per_doc = [task.score(d, [answer(r) for r in task.requests(d)]) for d in docs]
    metrics = task.aggregate(per_doc)        # {name: Metric(value, stderr or None)}

and a backend answers by request type: :class:`LoglikelihoodRequest` with
``(logprob, is_greedy)``; :class:`GenerateRequest` with the generated text (greedy, cut at
the first ``until`` string); :class:`PerplexityWindow` with the summed negative
log-likelihood, in nats, of its tokens at positions ``>= score_from``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from quantcal.errors import QuantcalError

from .base import (GenerateRequest, LoglikelihoodRequest, Metric, PerplexityWindow, Request,
                   Task, draw_shots, mean_metrics, mean_stderr, select)
from .data import DATA_DIR_ENV, Source, load_rows
from .gsm8k import (FLEXIBLE, GSM8K, STRICT, Gsm8kDoc, gsm8k_prompt, normalize_answer,
                    regex_extract)
from .hellaswag import HellaSwag, HellaswagDoc, hellaswag_doc, preprocess
from .perplexity import C4, WIKITEXT2, Perplexity, sliding_windows

TASKS: dict[str, Task] = {
    "hellaswag": HellaSwag(),
    "gsm8k": GSM8K(),
    "wikitext2": Perplexity("wikitext2", WIKITEXT2),
    "c4": Perplexity("c4", C4),
}


def get_task(name: str, **options: Any) -> Task:
    """The task called ``name``, with ``options`` replacing its settings (``seq_len`` and
    ``stride`` of a perplexity task, ``num_fewshot`` or ``max_new_tokens`` of gsm8k).

    Raises:
        QuantcalError: for an unknown name or setting.
    """
    try:
        task = TASKS[name]
    except KeyError:
        raise QuantcalError(f"unknown task '{name}'; choose from "
                            f"{', '.join(TASKS)}") from None
    unknown = set(options) - {f.name for f in dataclasses.fields(task)}
    if unknown:
        raise QuantcalError(f"task {name} has no setting {', '.join(sorted(unknown))}; "
                            f"it has {', '.join(f.name for f in dataclasses.fields(task))}")
    return dataclasses.replace(task, **options) if options else task


__all__ = [
    "C4", "DATA_DIR_ENV", "FLEXIBLE", "GSM8K", "GenerateRequest", "Gsm8kDoc", "HellaSwag",
    "HellaswagDoc", "LoglikelihoodRequest", "Metric", "Perplexity", "PerplexityWindow",
    "Request", "STRICT", "Source", "TASKS", "Task", "WIKITEXT2", "draw_shots", "get_task",
    "gsm8k_prompt", "hellaswag_doc", "load_rows", "mean_metrics", "mean_stderr",
    "normalize_answer", "preprocess", "regex_extract", "select", "sliding_windows",
]
