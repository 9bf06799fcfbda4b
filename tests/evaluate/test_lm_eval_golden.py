"""quantcal's HellaSwag and GSM8K against golden files written by lm-evaluation-harness
itself (tests/evaluate/fixtures/make_golden.py, lm-eval 0.4.13; lm-eval is not needed here).

Same documents in, same request strings out; same log-likelihoods or generations in, same
scores out; and the same log-likelihoods from lm-eval's HFLM and quantcal's torch backend
on the tests' tiny Llama. HellaSwag rows with the hub's fields must match exactly; the same
rows as the local llama.cpp-derived file holds them (``ctx`` only) may differ only by
ctx_b's capital, and are labelled lm-eval-like. CPU only, no network.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from quantcal.evaluate.tasks import GSM8K, Gsm8kDoc, HellaSwag, get_task, hellaswag_doc
from quantcal.evaluate.tasks.hellaswag import LM_EVAL, LM_EVAL_LIKE

FIXTURES = Path(__file__).parent / "fixtures"
HS = json.loads((FIXTURES / "hellaswag_lm_eval.json").read_text(encoding="utf-8"))
GS = json.loads((FIXTURES / "gsm8k_lm_eval.json").read_text(encoding="utf-8"))
N_FROM_LOCAL = 14  # the first 14 golden HellaSwag rows were split out of the local file
GSM_KEYS = {"strict-match": "exact_match_strict", "flexible-extract": "exact_match_flexible"}


def _pairs(requests) -> list[tuple[str, str]]:
    return [(r.context, r.continuation) for r in requests]


def _local_row(row: dict) -> dict:
    """The row as the local llama.cpp-derived file holds it: ``ctx``, no ctx_a/ctx_b."""
    return {k: v for k, v in row.items() if k not in ("ctx_a", "ctx_b")}


def test_golden_files_are_what_the_tests_expect():
    assert len(HS["docs"]) == 20 and len(GS["docs"]) == 5 and GS["num_fewshot"] == 5
    for d in HS["docs"]:  # the hub's ctx: ctx_a, then " " + ctx_b when there is one
        row = d["row"]
        assert row["ctx"] == (row["ctx_a"] + " " + row["ctx_b"] if row["ctx_b"] else row["ctx_a"])
    # the rows exercise both metrics disagreeing and the capitalisation of ctx_b
    assert any(d["scores"]["acc"] != d["scores"]["acc_norm"] for d in HS["docs"])
    assert sum(d["row"]["ctx_b"] != "" for d in HS["docs"][:N_FROM_LOCAL]) >= 8


@pytest.mark.parametrize("k", range(20))
def test_hellaswag_hub_row_requests_match_lm_eval(k):
    golden = HS["docs"][k]
    doc = hellaswag_doc(golden["row"])
    assert _pairs(HellaSwag().requests(doc)) == [tuple(r) for r in golden["requests"]]
    assert doc.exact


@pytest.mark.parametrize("k", range(20))
def test_hellaswag_scores_match_lm_eval(k):
    golden = HS["docs"][k]
    doc = hellaswag_doc(golden["row"])
    got = HellaSwag().score(doc, [(ll, False) for ll in golden["loglikelihoods"]])
    assert got == golden["scores"]


def test_hellaswag_aggregate_matches_lm_eval():
    per_doc = [HellaSwag().score(hellaswag_doc(d["row"]), [(ll, False) for ll in
                                                          d["loglikelihoods"]])
               for d in HS["docs"]]
    for name, metric in HellaSwag().aggregate(per_doc).items():
        value, stderr = HS["aggregate"][name]
        assert metric.value == pytest.approx(value, abs=1e-12)
        assert metric.stderr == pytest.approx(stderr, abs=1e-12)


def test_hellaswag_on_the_tiny_model_matches_lm_eval_hflm(tiny_tokenizer):
    """quantcal's torch backend against lm-eval's HFLM, same tiny Llama and tokenizer: the
    same log-likelihoods (tokenization, left truncation at 256 positions), the same scores."""
    from quantcal.evaluate.backends import TorchBackend
    from tinymodels import build_tiny_model

    golden = HS["tiny_model"]
    backend = TorchBackend(build_tiny_model("llama"), tiny_tokenizer, "cpu", batch_size=4)
    assert backend.max_length == golden["max_length"]
    per_doc = []
    for d, g in zip(HS["docs"], golden["docs"]):
        doc = hellaswag_doc(d["row"])
        got = backend.loglikelihood(_pairs(HellaSwag().requests(doc)))
        assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in g["responses"]],
                                                       abs=1e-3)
        assert [greedy for _, greedy in got] == [greedy for _, greedy in g["responses"]]
        per_doc.append(HellaSwag().score(doc, got))
        assert per_doc[-1] == g["scores"]
    for name, metric in HellaSwag().aggregate(per_doc).items():
        assert [metric.value, metric.stderr] == pytest.approx(golden["aggregate"][name])


@pytest.mark.parametrize("k", range(N_FROM_LOCAL))
def test_hellaswag_local_row_differs_only_by_ctx_b_capital(k):
    golden = HS["docs"][k]
    row = golden["row"]
    doc = hellaswag_doc(_local_row(row))
    want_query = golden["requests"][0][0]
    assert not doc.exact
    # endings: the same cleanup, character for character (also of [bracketed] text)
    assert [c for _, c in _pairs(HellaSwag().requests(doc))] == [
        c for _, c in golden["requests"]]
    # query: equal but for ctx_b, which lm-eval capitalises and the local file cannot
    assert len(doc.query) == len(want_query) and doc.query.lower() == want_query.lower()
    differs = [i for i, (a, b) in enumerate(zip(doc.query, want_query)) if a != b]
    assert all(i >= len(doc.query) - len(row["ctx_b"]) for i in differs)
    assert (doc.query == want_query) == (row["ctx_b"][:1] == row["ctx_b"][:1].upper())


def test_hellaswag_local_rows_are_labelled_lm_eval_like():
    hub = [hellaswag_doc(d["row"]) for d in HS["docs"]]
    local = [hellaswag_doc(_local_row(d["row"])) for d in HS["docs"]]
    assert HellaSwag().protocol(hub) == LM_EVAL == "lm-eval"
    assert HellaSwag().protocol(local) == LM_EVAL_LIKE
    assert HellaSwag().protocol(hub[:3] + local[3:4]).startswith("lm-eval-like")


@pytest.fixture(scope="module")
def gsm8k_docs(sample_data) -> list[Gsm8kDoc]:
    return GSM8K().load(sample_data, limit=len(GS["docs"]))


@pytest.fixture(scope="module")
def gsm8k_full_docs(full_data) -> list[Gsm8kDoc]:
    """lm-eval's exemplars are drawn from all of GSM8K train: the full data only."""
    return GSM8K().load(full_data, limit=len(GS["docs"]))


@pytest.mark.parametrize("k", range(5))
def test_gsm8k_request_matches_lm_eval(gsm8k_full_docs, k):
    golden = GS["docs"][k]
    (req,) = GSM8K().requests(gsm8k_full_docs[k])
    assert req.context == golden["context"]
    assert req.until == tuple(golden["gen_kwargs"]["until"])
    assert golden["gen_kwargs"]["do_sample"] is False


@pytest.mark.parametrize("k", range(5))
def test_gsm8k_scores_match_lm_eval(gsm8k_docs, k):
    golden = GS["docs"][k]
    assert gsm8k_docs[k].question == golden["question"]
    got = GSM8K().score(gsm8k_docs[k], [golden["generation"]])
    assert got == {GSM_KEYS[f]: v for f, v in golden["exact_match"].items()}
    assert get_task("gsm8k").protocol(gsm8k_docs) == LM_EVAL


@pytest.mark.parametrize("case", GS["filter_cases"], ids=lambda c: c["generation"][:24])
def test_gsm8k_filters_match_lm_eval(case):
    got = GSM8K().score(Gsm8kDoc("q", case["answer"]), [case["generation"]])
    assert got == {GSM_KEYS[f]: v for f, v in case["exact_match"].items()}



class _LengthBackend:
    """Answers log-likelihood requests with minus the continuation's length."""
    name, tokenizer, max_length = "fake", None, 2048

    def loglikelihood(self, requests):
        return [(-float(len(c)), False) for _, c in requests]


@pytest.mark.parametrize("local, label", [(False, LM_EVAL), (True, LM_EVAL_LIKE)])
def test_eval_json_says_how_hellaswag_was_built(tmp_path, local, label):
    from quantcal.evaluate.evaluator import evaluate_variant, format_results, read_eval
    from quantcal.rundir import RunDir

    rows = [_local_row(d["row"]) if local else d["row"] for d in HS["docs"]]
    name = "hellaswag_val.llamacpp_derived.jsonl.gz" if local else "hellaswag_val.jsonl"
    data = tmp_path / "data" / "hellaswag"
    data.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if local:
        (data / name).write_bytes(gzip.compress(text.encode()))
    else:
        (data / name).write_text(text, encoding="utf-8")
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    evaluate_variant("v", _LengthBackend(), ["hellaswag"], run, data_dir=data.parent,
                     limit=None, sample=None, seed=1234, progress=False)
    record = read_eval(run)
    assert record.variants["v"].protocols == {"hellaswag": label}
    assert ("v: hellaswag is lm-eval-like" in format_results(record)) == local
