"""lm-eval's options on ``quantcal eval``: ``--num-fewshot`` (also ``--num_fewshot``),
``--output`` (``--output_path``) and ``--log-samples`` (``--log_samples``). Few-shot prompts
are checked against lm-eval's own recipe written out here (its ContextSampler: one
``random.Random(1234)`` walked over the split; "query target" exemplars joined by blank
lines), the results file against eval.json, the samples against the documents scored."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantcal.cli import cli
from quantcal.evaluate.evaluator import read_eval
from quantcal.evaluate.tasks import preprocess
from quantcal.rundir import RunDir


def _invoke(args):
    return CliRunner().invoke(cli, args)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama_dir, c4_file) -> Path:
    out = tmp_path_factory.mktemp("eval-options") / "run"
    for argv in (["calibrate", "--model", str(tiny_llama_dir), "--data", c4_file, "--samples",
                  "4", "--seq-len", "32", "--sensitivity", "fast", "--sensitivity-samples",
                  "2", "--keep", "*", "--device", "cpu", "--run", str(out)],
                 ["export", "--provider", "cpu", "--run", str(out)]):
        res = _invoke(argv)
        assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory, sample_data) -> Path:
    """The shipped data plus a HellaSwag train file (rows of a made-up activity, so no
    exemplar equals an evaluated document)."""
    root = tmp_path_factory.mktemp("data-with-train")
    for item in sample_data.iterdir():
        (root / item.name).symlink_to(item)
    (root / "hellaswag").unlink()
    (root / "hellaswag").mkdir()
    val = sample_data / "hellaswag" / "hellaswag_val.llamacpp_derived.jsonl.gz"
    (root / "hellaswag" / val.name).symlink_to(val)
    rows = [json.loads(line) for line in gzip.open(val, "rt", encoding="utf-8")][:12]
    train = [dict(r, activity_label=f"Practice {i}") for i, r in enumerate(rows)]
    (root / "hellaswag" / "hellaswag_train.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in train), encoding="utf-8")
    return root


def _eval(run, data, *args):
    res = _invoke(["eval", "--run", str(run), "--provider", "cpu", "--data-dir", str(data),
                   *args])
    assert res.exit_code == 0, res.output
    return res


def _samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_hellaswag_few_shot_prompts_follow_lm_eval(run, data, tmp_path):
    _eval(run, data, "--tasks", "hellaswag", "--limit", "3", "--num_fewshot", "2",
          "--output_path", str(tmp_path / "out"), "--log_samples")
    train = _samples(data / "hellaswag" / "hellaswag_train.jsonl")
    rnd = random.Random(1234)  # lm-eval: rnd.sample(train docs, n), walked in document order
    for record in _samples(tmp_path / "out" / "samples_hellaswag.jsonl"):
        shots = [train[i] for i in rnd.sample(range(len(train)), 2)]
        prefix = "".join(preprocess(f"{r['activity_label']}: {r['ctx']}") + " "
                         + preprocess(r["endings"][r["label"]]) + "\n\n" for r in shots)
        query = record["doc"]["query"]
        assert [a["context"] for a in record["arguments"]] == [prefix + query] * 4
        assert [a["continuation"] for a in record["arguments"]] == [
            " " + c for c in record["doc"]["choices"]]
        assert len(record["resps"]) == 4 and {"acc", "acc_norm"} <= set(record)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["n-shot"] == {"hellaswag": 2}


def test_gsm8k_num_fewshot_sets_the_exemplars(data):
    """Through the evaluator's task preparation (the tiny model's 256 positions cannot hold
    GSM8K's 256 new tokens, so not end to end)."""
    from types import SimpleNamespace

    from quantcal.evaluate.evaluator import prepare_task

    backend = SimpleNamespace(tokenizer=None, max_length=2048, path=None)
    task, (doc,) = prepare_task("gsm8k", backend, data_dir=data, limit=1, sample=None,
                                seed=0, num_fewshot=1)
    train = _samples(data / "gsm8k" / "train.jsonl")
    (shot,) = [train[i] for i in random.Random(1234).sample(range(len(train)), 1)]
    assert task.requests(doc)[0].context == (
        f"Question: {shot['question']}\nAnswer: {shot['answer']}\n\n"
        f"Question: {doc.question}\nAnswer:")


def test_results_file_is_lm_eval_shaped_and_matches_eval_json(run, data, tmp_path):
    res = _eval(run, data, "--tasks", "hellaswag,wikitext2", "--limit", "2", "-o",
                str(tmp_path / "r.json"), "--log-samples", "--baseline")
    results = json.loads((tmp_path / "r.json").read_text())
    variants = read_eval(RunDir(run)).variants
    onnx = next(v for k, v in variants.items() if k.startswith("onnx"))
    hs = results["results"]["hellaswag"]
    assert hs["acc,none"] == onnx.metrics["hellaswag"]["acc"][0]
    assert hs["acc_stderr,none"] == onnx.metrics["hellaswag"]["acc"][1]
    assert hs["acc_norm,none"] == onnx.metrics["hellaswag"]["acc_norm"][0]
    ppl = results["results"]["wikitext2"]["perplexity,none"]
    assert ppl == onnx.metrics["wikitext2"]["perplexity"][0]
    assert results["n-shot"] == {"hellaswag": 0, "wikitext2": 0}
    assert results["n-samples"]["hellaswag"] == {"effective": 2}
    assert results["baseline"]["results"]["hellaswag"]["alias"] == "hellaswag"
    for name in ("samples_hellaswag.jsonl", "samples_wikitext2.jsonl",
                 "samples_hellaswag_baseline.jsonl"):
        assert len(_samples(tmp_path / name)) == 2, name
    assert "acc_norm" in res.stdout  # the table is printed as before


@pytest.mark.parametrize("args, words", [
    (["--tasks", "hellaswag", "--log-samples"], "--output"),
    (["--tasks", "wikitext2", "--num-fewshot", "3"], "--num-fewshot"),
    (["--tasks", "hellaswag", "--num-fewshot", "-1"], "--num-fewshot"),
    (["--tasks", "hellaswag", "--limit", "1", "--output", "{file}/r.json"], "afile"),
])
def test_bad_options_are_one_line(run, data, tmp_path, args, words):
    (tmp_path / "afile").write_text("not a folder")
    args = [a.replace("{file}", str(tmp_path / "afile")) for a in args]
    res = _invoke(["eval", "--run", str(run), "--provider", "cpu", "--data-dir", str(data),
                   *args])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith("quantcal: error: ") and words in lines[0], lines[0]
