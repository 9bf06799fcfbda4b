"""``evaluate``: the stage's entry point; runs tasks on a backend and writes ``eval.json``.

Every task runs the same way: documents are loaded, their requests answered by the backend
in batches grouped by request type (log-likelihoods together, generations together,
perplexity windows one by one), then scored and aggregated with standard errors.
``eval.json`` keeps one entry per evaluated variant (the quantized export, the FP baseline,
...), so ``quantcal report`` can compare them; a re-run replaces that variant's entry.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

from tqdm.auto import tqdm

from quantcal.config import Strict
from quantcal.errors import QuantcalError
from quantcal.evaluate.tasks import (
    GenerateRequest, LoglikelihoodRequest, PerplexityWindow, get_task, select,
)
from quantcal.export.positions import model_positions
from quantcal.resources import describe as describe_peaks, peak_figures
from quantcal.rundir import EVAL_JSON, RUN_JSON, RunDir, atomic_write_json, read_json
from quantcal.textdata import doc_digest


@dataclass(frozen=True)
class VariantResult(Strict):
    """One evaluated model: metrics ``{task: {metric: [value, stderr]}}`` and what it costs."""

    model: str
    backend: str
    metrics: dict[str, dict[str, list[float | None]]]
    docs: dict[str, int] = field(default_factory=dict)
    size_bytes: int = 0
    speed: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    source: str = ""  # the model file or folder scored
    made_from: dict[str, str] = field(default_factory=dict)  # sha256 of its files
    # how each task was built: "lm-eval" (as lm-evaluation-harness), or "lm-eval-like: why"
    protocols: dict[str, str] = field(default_factory=dict)
    # per task scored with --allow-overlap: {"documents": n, "overlapping": k} of its text
    # that calibration read (run.json's data_source digests)
    overlap: dict[str, dict[str, int]] = field(default_factory=dict)
    # peak host RAM and peak GPU memory (torch) of the evaluation, in bytes
    resources: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalRecord(Strict):
    """``eval.json``: every evaluated variant of this run, by label."""

    versioned: ClassVar[bool] = True

    variants: dict[str, VariantResult] = field(default_factory=dict)


def _answer(backend, requests: Sequence, progress: bool, label: str) -> list[Any]:
    """Responses in request order, each request type answered in one batched call."""
    out: list[Any] = [None] * len(requests)
    ll = [(i, r) for i, r in enumerate(requests) if isinstance(r, LoglikelihoodRequest)]
    gen = [(i, r) for i, r in enumerate(requests) if isinstance(r, GenerateRequest)]
    ppl = [(i, r) for i, r in enumerate(requests) if isinstance(r, PerplexityWindow)]
    if ll:
        for (i, _), res in zip(ll, backend.loglikelihood([(r.context, r.continuation)
                                                          for _, r in ll])):
            out[i] = res
    for i, r in tqdm(gen, desc=f"{label} generate", disable=not progress or not gen):
        out[i] = backend.generate_until([(r.context, tuple(r.until), r.max_new_tokens)])[0]
    for i, r in tqdm(ppl, desc=f"{label} windows", disable=not progress or not ppl):
        logp = backend.token_logprobs(list(r.input_ids))  # log p(token j+1 | prefix)
        out[i] = float(-logp[max(r.score_from - 1, 0):].sum())
    return out


PERPLEXITY_TASKS = ("wikitext2", "c4")
DEFAULT_WINDOW = 2048  # perplexity tokens per window without --seq-len (or the model's limit)


def _positions(backend) -> int:
    """Positions the backend's model takes: an export's own limit when it records one."""
    path = getattr(backend, "path", None)
    limit = model_positions(path) if path is not None else None
    return min(backend.max_length, limit or backend.max_length)


def _task(name: str, backend, seq_len: int | None, stride: int | None,
          num_fewshot: int | None = None):
    """The task, perplexity windows sized to ``--seq-len``/``--stride`` and the model;
    sizes the model cannot take are refused, not cut down silently. ``num_fewshot``
    replaces the exemplar count of the tasks that have one."""
    if name not in PERPLEXITY_TASKS:
        return get_task(name, **({} if num_fewshot is None else {"num_fewshot": num_fewshot}))
    limit = _positions(backend)
    if seq_len is not None and seq_len > limit:
        raise QuantcalError(f"--seq-len {seq_len} is longer than the model's {limit} "
                            f"positions; pass --seq-len {limit} or less")
    length = seq_len or min(DEFAULT_WINDOW, limit)
    if stride is not None and stride > length:
        raise QuantcalError(f"--stride {stride} is longer than the {length}-token window "
                            f"(--seq-len); pass --stride {length} or less")
    return get_task(name, seq_len=length, stride=stride or length)


def prepare_task(name: str, backend, *, data_dir: Path | None, limit: int | None,
                 sample: int | None, seed: int, seq_len: int | None = None,
                 stride: int | None = None, num_fewshot: int | None = None
                 ) -> tuple[Any, list]:
    """The task and the documents to score; ``--limit``/``--sample`` above what the task
    holds are refused with the count."""
    task = _task(name, backend, seq_len, stride, num_fewshot)
    everything = task.load(data_dir, tokenizer=backend.tokenizer)
    unit = "windows" if name in PERPLEXITY_TASKS else "documents"
    for flag, value in (("--limit", limit), ("--sample", sample)):
        if value is not None and value > len(everything):
            raise QuantcalError(f"{flag} {value} is more than {name} holds ({len(everything)} "
                                f"{unit}); pass {flag} {len(everything)} or less")
    docs = select(everything, limit, sample, seed)
    if not docs:
        raise QuantcalError(f"{name}: no documents to evaluate (check --limit/--sample)")
    return task, docs


def task_protocol(task, docs: Sequence) -> str | None:
    """How ``docs`` of ``task`` were built and scored: "lm-eval" or "lm-eval-like: ..." for
    tasks that follow lm-evaluation-harness; perplexity names its windows and its standard
    error's method."""
    describe = getattr(task, "protocol", None)
    return describe(docs) if describe is not None else None


def run_task(name: str, backend, *, data_dir: Path | None, limit: int | None,
             sample: int | None, seed: int, seq_len: int | None = None,
             stride: int | None = None, progress: bool = True,
             prepared: tuple[Any, list] | None = None,
             samples: list[dict] | None = None) -> tuple[dict, int]:
    """Metrics ``{metric: [value, stderr]}`` of one task, and the number of documents
    (``prepared``: :func:`prepare_task`'s result, when already made). ``samples``: a list
    to append one record per document to (its requests, responses and scores)."""
    task, docs = prepared or prepare_task(name, backend, data_dir=data_dir, limit=limit,
                                          sample=sample, seed=seed, seq_len=seq_len,
                                          stride=stride)
    per_doc = []
    chunk = 64  # documents per batch of requests: progress and bounded memory
    bar = tqdm(total=len(docs), desc=name, unit="doc", disable=not progress)
    for start in range(0, len(docs), chunk):
        part = docs[start:start + chunk]
        reqs = [task.requests(d) for d in part]
        flat = [r for rs in reqs for r in rs]
        answers = iter(_answer(backend, flat, progress and len(part) > 1, name))
        for doc, rs in zip(part, reqs):
            responses = [next(answers) for _ in rs]
            per_doc.append(task.score(doc, responses))
            if samples is not None:
                samples.append(sample_record(len(samples), doc, rs, responses, per_doc[-1]))
        bar.update(len(part))
    bar.close()
    metrics = {k: [m.value, m.stderr] for k, m in task.aggregate(per_doc).items()}
    return metrics, len(docs)


def distinct_label(label: str, source: str | None, record: EvalRecord, root: Path) -> str:
    """``label``, or, when ``eval.json`` holds it for a file at another path (two exports
    both named ``model.onnx``), the label with the file's folder (``onnx-cuda:x/model.onnx``),
    else its whole path: one variant never replaces another's figures. Sources inside the
    run directory ``root`` are recorded relative to it."""
    def same(a: str | None, b: str | None) -> bool:
        return not a or not b or os.path.realpath(root / a) == os.path.realpath(root / b)

    earlier = record.variants.get(label)
    if earlier is None or same(earlier.source, source):
        return label
    kind, _, name = label.partition(":")
    parent = Path(source).parent.name
    for candidate in (f"{kind}:{parent}/{name}", f"{kind}:{source}"):
        other = record.variants.get(candidate)
        if other is None or same(other.source, source):
            return candidate
    return f"{kind}:{source}"


def evaluate_variant(label: str, backend, tasks: Sequence[str], run: RunDir, *,
                     data_dir: Path | None, limit: int | None, sample: int | None,
                     seed: int, seq_len: int | None = None, stride: int | None = None,
                     size_bytes: int = 0, speed: dict | None = None,
                     source: str = "", made_from: dict | None = None,
                     progress: bool = True, allow_overlap: bool = False,
                     num_fewshot: int | None = None,
                     samples: dict[str, list[dict]] | None = None) -> VariantResult:
    """Run ``tasks`` on ``backend`` and store the result under ``label`` in ``eval.json``;
    text calibration read is refused unless ``allow_overlap`` (:func:`check_overlap`).
    ``samples``: a dict to fill with each task's per-document records."""
    t = time.perf_counter()
    overlap = {name: o for name in tasks
               if (o := check_overlap(name, run, data_dir, allow_overlap)) is not None}
    options = dict(data_dir=data_dir, limit=limit, sample=sample, seed=seed, seq_len=seq_len,
                   stride=stride)
    prepared = {name: prepare_task(name, backend, **options, num_fewshot=num_fewshot)
                for name in tasks}  # fail early
    metrics, docs = {}, {}
    protocols = {name: p for name in tasks
                 if (p := task_protocol(*prepared[name])) is not None}
    for name in tasks:
        logged = None if samples is None else samples.setdefault(name, [])
        metrics[name], docs[name] = run_task(name, backend, **options, progress=progress,
                                             prepared=prepared[name], samples=logged)
    record = read_eval(run)
    label = distinct_label(label, source, record, run.path)
    earlier = record.variants.get(label)
    if earlier is not None and earlier.made_from != (made_from or {}):
        earlier = None  # it scored other files (an earlier export): its tasks are stale
    if earlier is not None:  # other tasks of the same variant, evaluated before, are kept
        metrics, docs = {**earlier.metrics, **metrics}, {**earlier.docs, **docs}
        protocols = {**{t: p for t, p in earlier.protocols.items() if t not in tasks},
                     **protocols}
        overlap = {**{t: o for t, o in earlier.overlap.items() if t not in tasks}, **overlap}
    result = VariantResult(model=label, backend=backend.name, metrics=metrics, docs=docs,
                           size_bytes=size_bytes, speed=speed or {},
                           seconds=time.perf_counter() - t, resources=peak_figures(),
                           source=source,
                           made_from=made_from or {}, protocols=protocols, overlap=overlap)
    atomic_write_json(run.file(EVAL_JSON),
                      EvalRecord(variants={**record.variants, label: result}))
    return result


def sample_record(doc_id: int, doc: Any, requests: Sequence, responses: Sequence,
                  scores: dict[str, float]) -> dict:
    """One document as lm-eval's ``--log_samples`` writes it: the document, the requests
    made of it (``arguments``), the backend's answers (``resps``) and its scores."""
    def plain(value: Any) -> Any:
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return {"doc_id": doc_id, "doc": plain(doc), "arguments": [plain(r) for r in requests],
            "resps": [list(r) if isinstance(r, tuple) else r for r in responses], **scores}


def check_overlap(name: str, run: RunDir, data_dir: Path | None,
                  allow: bool) -> dict[str, int] | None:
    """How many of perplexity task ``name``'s documents the run's calibration read (by the
    digests in run.json); None when none did or there is nothing to compare.

    Raises:
        QuantcalError: some did and ``allow`` is False.
    """
    if name not in PERPLEXITY_TASKS or not run.has(RUN_JSON):
        return None
    source = run.read_run().data_source
    if source is None or not source.digests:
        return None
    seen = set(source.digests)
    docs = get_task(name).documents(data_dir)
    hits = sum(doc_digest(d) in seen for d in docs)
    if not hits:
        return None
    if not allow:
        raise QuantcalError(
            f"{name}: {hits} of its {len(docs)} documents were read by calibration ("
            f"--data {run.read_run().config.data}, {source.path or source.split}); evaluate "
            f"other text, calibrate on other text, or pass --allow-overlap to score them "
            f"anyway (the overlap is recorded in eval.json)")
    return {"documents": len(docs), "overlapping": hits}


def read_eval(run: RunDir) -> EvalRecord:
    if not run.has(EVAL_JSON):
        return EvalRecord()
    return EvalRecord.from_dict(read_json(run.file(EVAL_JSON), "quantcal eval"),
                                where=EVAL_JSON)


def format_results(record: EvalRecord) -> str:
    """A terminal table: one row per (task, metric), one column per variant."""
    labels = list(record.variants)
    rows = sorted({(t, m) for v in record.variants.values() for t, ms in v.metrics.items()
                   for m in ms})
    width = max([len(lbl) for lbl in labels] + [18])
    lines = [f"{'task':10} {'metric':22} " + " ".join(f"{lbl:>{width}}" for lbl in labels)]
    for task, metric in rows:
        cells = []
        for lbl in labels:
            value = record.variants[lbl].metrics.get(task, {}).get(metric)
            if value is None:
                cells.append(f"{'-':>{width}}")
            else:
                v, se = value
                cells.append(f"{v:.4f}" + (f" ± {se:.4f}" if se is not None else "")
                             .rjust(0))
                cells[-1] = cells[-1].rjust(width)
        lines.append(f"{task:10} {metric:22} " + " ".join(cells))
    sizes = " ".join(f"{record.variants[lbl].size_bytes / 1e6:>{width - 3}.1f} MB"
                     for lbl in labels)
    lines.append(f"{'size':10} {'':22} {sizes}")
    lines += [f"{lbl}: {task} is {p}" for lbl in labels
              for task, p in record.variants[lbl].protocols.items()
              if p.startswith("lm-eval-like")]
    lines += [f"{lbl}: {v.seconds:.1f} s, {describe_peaks(v.resources)}"
              for lbl, v in record.variants.items() if v.resources]
    return "\n".join(lines)
