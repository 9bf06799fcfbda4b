"""`quantcal eval` end to end on a tiny model: the exported all-fp16 model and the torch
baseline give the same numbers; eval.json keeps both variants; the report shows them."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from quantcal.cli import cli
from quantcal.evaluate.evaluator import read_eval
from quantcal.rundir import RunDir


def _ok(args):
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_llama_dir, c4_file):
    run = tmp_path_factory.mktemp("eval") / "run"
    _ok(["calibrate", "--model", str(tiny_llama_dir), "--data",
         c4_file, "--samples", "4", "--seq-len",
         "32", "--sensitivity", "fast", "--sensitivity-samples", "2", "--keep", "*",
         "--run", str(run)])
    _ok(["export", "--provider", "cpu", "--run", str(run)])
    return RunDir(run)


def test_eval_onnx_and_baseline_agree(exported, sample_data):
    out = _ok(["eval", "--run", str(exported.path), "--tasks", "hellaswag,wikitext2",
               "--limit", "6", "--provider", "cpu", "--baseline", "--data-dir",
               str(sample_data)])
    assert "acc_norm" in out and "perplexity" in out
    record = read_eval(exported)
    assert len(record.variants) == 2
    onnx, torch_ = (record.variants[k] for k in sorted(record.variants,
                                                         key=lambda k: k.startswith("base")))
    assert onnx.metrics["hellaswag"]["acc_norm"][0] == torch_.metrics["hellaswag"]["acc_norm"][0]
    ppl = [v.metrics["wikitext2"]["perplexity"][0] for v in (onnx, torch_)]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-3)
    assert onnx.docs["hellaswag"] == 6 and onnx.speed["decode_tok_s"] > 0
    assert "delta method" in onnx.protocols["wikitext2"]  # how its stderr was made
    _ok(["report", "--run", str(exported.path)])
    text = exported.file("report.md").read_text()
    assert "## Accuracy, size and speed" in text and exported.has("accuracy_vs_size.png")


def test_later_tasks_add_to_a_variant(exported, sample_data):
    _ok(["eval", "--run", str(exported.path), "--tasks", "hellaswag", "--limit", "2",
         "--provider", "cpu", "--data-dir", str(sample_data)])
    _ok(["eval", "--run", str(exported.path), "--tasks", "wikitext2", "--limit", "1",
         "--provider", "cpu", "--data-dir", str(sample_data)])
    variant = next(v for k, v in read_eval(exported).variants.items() if k.startswith("onnx"))
    assert {"hellaswag", "wikitext2"} <= set(variant.metrics)


def test_eval_unknown_task_is_one_line(exported):
    res = CliRunner().invoke(cli, ["eval", "--run", str(exported.path), "--tasks", "mmlu",
                                   "--provider", "cpu"])
    assert res.exit_code == 2 and "mmlu" in res.output and "Traceback" not in res.output


def test_two_exports_named_alike_keep_their_own_figures(exported, sample_data, tmp_path):
    """Two exports both called model.onnx, in different folders, are two variants: the
    second never takes the first one's row (it used to, by file name)."""
    other = tmp_path / "x_other" / "model.onnx"
    _ok(["export", "--provider", "cpu", "--run", str(exported.path), "-o", str(other)])
    for model in (exported.file("model.onnx"), other):
        _ok(["eval", str(model), "--run", str(exported.path), "--tasks", "hellaswag",
             "--limit", "2", "--provider", "cpu", "--data-dir", str(sample_data)])
    variants = read_eval(exported).variants
    sources = {v.source for k, v in variants.items() if k.startswith("onnx")}
    assert {"model.onnx", str(other.resolve())} <= sources  # inside the run: relative
    assert "onnx-cpu:x_other/model.onnx" in variants
