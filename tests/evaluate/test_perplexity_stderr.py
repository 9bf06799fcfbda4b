"""Perplexity's standard error (delta method over windows) against independent references:
numpy's standard error of the windows' mean NLL (equal windows), the textbook delta method
for a ratio of means (unequal windows) and a bootstrap; the report names its units."""

from __future__ import annotations

import math

import numpy as np
import pytest

from quantcal.evaluate.evaluator import EvalRecord, VariantResult
from quantcal.evaluate.tasks import PerplexityWindow, get_task


def _aggregate(nll, tokens):
    task = get_task("wikitext2", seq_len=64, stride=64)
    windows = [PerplexityWindow(list(range(int(t) + 1)), 1) for t in tokens]
    return task.aggregate([task.score(w, [y]) for w, y in zip(windows, nll)])


def test_equal_windows_give_the_stderr_of_the_mean_nll():
    rng = np.random.default_rng(0)
    per_token = rng.normal(3.0, 0.2, size=40)  # each window's mean NLL
    m = _aggregate(per_token * 63, [63] * 40)
    se = per_token.std(ddof=1) / math.sqrt(40)
    assert m["nll_per_token"].stderr == pytest.approx(se, rel=1e-9)
    assert m["perplexity"].value == pytest.approx(math.exp(per_token.mean()), rel=1e-12)
    assert m["perplexity"].stderr == pytest.approx(math.exp(per_token.mean()) * se, rel=1e-9)


def test_unequal_windows_follow_the_delta_method_for_a_ratio():
    rng = np.random.default_rng(1)
    tokens = rng.integers(20, 64, size=30).astype(float)
    nll = tokens * rng.normal(3.0, 0.3, size=30)
    m = _aggregate(nll, tokens)
    r = nll.sum() / tokens.sum()
    cov = np.cov(nll, tokens, ddof=1)  # var(R) ~ (s_y^2 - 2R s_xy + R^2 s_x^2) / (n xbar^2)
    var = (cov[0, 0] - 2 * r * cov[0, 1] + r * r * cov[1, 1]) / (30 * tokens.mean() ** 2)
    assert m["nll_per_token"].stderr == pytest.approx(math.sqrt(var), rel=1e-9)
    boot = [(nll[i].sum() / tokens[i].sum()) for i in
            (rng.integers(0, 30, size=30) for _ in range(4000))]
    assert m["nll_per_token"].stderr == pytest.approx(np.std(boot), rel=0.15)


def test_one_window_has_no_stderr():
    m = _aggregate([120.0], [60])
    assert m["perplexity"].stderr is None and m["perplexity"].value == pytest.approx(math.e ** 2)


def test_report_counts_windows_and_tokens_and_names_the_method():
    from quantcal.evaluate.report import _error_notes

    variant = VariantResult(model="q", backend="onnxruntime", metrics={
        "wikitext2": {"perplexity": [36.48, 0.91], "nll_per_token": [3.597, 0.025],
                      "scored_tokens": [287_644.0, None]},
        "hellaswag": {"acc": [0.35, 0.015]}}, docs={"wikitext2": 141, "hellaswag": 1000})
    text = " ".join(_error_notes(EvalRecord(variants={"q": variant})))
    assert "wikitext2: 141 windows, 287,644 scored tokens" in text
    assert "hellaswag: 1000 documents" in text and "141 docs" not in text
    assert "delta method over windows" in text
