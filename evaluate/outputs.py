"""``quantcal eval --output PATH [--log-samples]``: the results JSON and per-document samples
laid out as lm-evaluation-harness writes them (``--output_path``, ``--log_samples``), so
tools that read lm-eval's files read quantcal's.

Writes ``PATH`` (a ``.json`` file) or ``PATH/results.json`` (a folder), and beside it
``samples_<task>.jsonl`` (``samples_<task>_baseline.jsonl`` for the FP baseline), each file
atomically; ``eval.json`` in the run directory is written as always. Metric keys follow
lm-eval's ``"<metric>,<filter>"``: ``acc,none``, ``acc_stderr,none``, and for GSM8K
``exact_match,strict-match`` and ``exact_match,flexible-extract``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from quantcal.rundir import atomic_write_bytes, atomic_write_json

# quantcal's metric name -> lm-eval's (metric, filter)
_LM_EVAL_KEYS = {"exact_match_strict": ("exact_match", "strict-match"),
                 "exact_match_flexible": ("exact_match", "flexible-extract")}


def results_path(output: Path) -> Path:
    """The results file ``--output`` names: itself when it ends in .json, else a file in
    that folder."""
    output = Path(output)
    return output if output.suffix == ".json" else output / "results.json"


def lm_eval_results(metrics: Mapping[str, Mapping[str, list]], n_shot: Mapping[str, int],
                    docs: Mapping[str, int], config: Mapping[str, Any]) -> dict:
    """``{"results": {task: {"acc,none": v, "acc_stderr,none": se, ...}}, "n-shot": ...,
    "n-samples": ..., "config": ...}`` from quantcal's ``{task: {metric: [value, se]}}``."""
    results: dict[str, dict[str, Any]] = {}
    for task, by_metric in metrics.items():
        row: dict[str, Any] = {"alias": task}
        for name, (value, stderr) in by_metric.items():
            metric, filt = _LM_EVAL_KEYS.get(name, (name, "none"))
            row[f"{metric},{filt}"] = value
            row[f"{metric}_stderr,{filt}"] = "N/A" if stderr is None else stderr
        results[task] = row
    return {"results": results, "n-shot": dict(n_shot),
            "n-samples": {t: {"effective": n} for t, n in docs.items()},
            "config": dict(config)}


def _jsonable(value: Any) -> Any:
    """numpy scalars (a backend's log-likelihoods) as Python numbers."""
    return value.item() if hasattr(value, "item") else str(value)


def write_outputs(output: Path, results: dict, samples: Mapping[str, Mapping[str, list]]
                  ) -> Path:
    """Write the results file and, per variant suffix and task, its samples; returns the
    results file's path. ``samples``: ``{suffix: {task: [record, ...]}}``."""
    path = results_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    for suffix, by_task in samples.items():
        for task, records in by_task.items():
            lines = "".join(json.dumps(r, default=_jsonable) + "\n" for r in records)
            atomic_write_bytes(path.parent / f"samples_{task}{suffix}.jsonl", lines.encode())
    atomic_write_json(path, results)
    return path
