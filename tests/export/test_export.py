"""`quantcal export` on tiny Llama, Qwen2 and GPT-2 models: the ONNX logits match torch
(fp32, and the plan's fake-quant), KV-cache decoding equals recomputation, and the graph
holds exactly the quantized nodes the plan names."""

from __future__ import annotations

import json

import onnx
import pytest
from click.testing import CliRunner

from quantcal.cli import cli
from quantcal.export.emit import graph_op_counts, planned_op_counts
from quantcal.plancheck import resolved_formats
from quantcal.rundir import EXPORT_JSON, MODEL, PLAN, RunDir


def _calibrate(model_dir, run, data, *extra):
    res = CliRunner().invoke(cli, [
        "calibrate", "--model", str(model_dir), "--data", data, "--samples", "4", "--seq-len",
        "32", "--batch-size", "2", "--sensitivity", "fast", "--sensitivity-samples", "2",
        "--run", str(run), *extra])
    assert res.exit_code == 0, res.output
    return RunDir(run)


@pytest.fixture
def c4(shared_data):
    return str(shared_data / "c4" / "c4_validation_2k.jsonl.gz")


def test_fp32_export_matches_torch(tiny_model_dir, tmp_path, c4):
    run = _calibrate(tiny_model_dir, tmp_path / "run", c4, "--keep", "*")  # all fp16 weights
    res = CliRunner().invoke(cli, ["export", "--provider", "cpu", "--run", str(run.path)])
    assert res.exit_code == 0, res.output
    record = json.loads(run.file(EXPORT_JSON).read_text())
    assert record["passed"] and record["parity"]["logits_max_abs"] < 1e-3
    assert record["parity"]["greedy_match"] == 1.0
    onnx.checker.check_model(str(run.file(MODEL)))
    assert run.file(MODEL + ".data").exists()


def test_mixed_plan_export_matches_fake_quant(tiny_model_dir, tmp_path, c4):
    run = _calibrate(tiny_model_dir, tmp_path / "run", c4, "--formats",
                     "int8,int4-g32,w8a8", "--target-bits", "9")
    res = CliRunner().invoke(cli, ["export", "--provider", "cpu", "--run", str(run.path)])
    assert res.exit_code == 0, res.output
    record = json.loads(run.file(EXPORT_JSON).read_text())
    assert record["parity"]["logits_max_abs"] <= record["parity"]["tolerance"]
    assert record["parity"]["greedy_match"] == 1.0
    # exactly the nodes the plan names, layer by layer
    formats = resolved_formats(run.read_plan(), run.read_run(), ["int8", "int4-g32", "w8a8"])
    graph = onnx.load(str(run.file(MODEL)), load_external_data=False)
    assert graph_op_counts(graph, formats) == planned_op_counts(formats)
    assert len({f.name for f in formats.values()}) >= 2  # a real mix
    res = CliRunner().invoke(cli, ["generate", "--run", str(run.path), "--prompt", "The",
                                   "--max-new-tokens", "5", "--provider", "cpu"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("The") and "tokens on cpu" in res.output


def test_edited_plan_is_exported_and_bad_plan_rejected(tiny_llama_dir, tmp_path, c4):
    run = _calibrate(tiny_llama_dir, tmp_path / "run", c4, "--formats", "int8,int4-g32",
                     "--target-bits", "9")
    data = json.loads(run.file(PLAN).read_text())
    data["layers"]["model.layers.0.mlp.down_proj"]["format"] = "int4-g32"
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    res = CliRunner().invoke(cli, ["export", "--provider", "cpu", "--run", str(run.path),
                                   "--plan", str(edited)])
    assert res.exit_code == 0, res.output
    graph = onnx.load(str(run.file(MODEL)), load_external_data=False)
    assert any(n.name == "/model/layers.0/mlp/down_proj/MatMulNBits" for n in graph.graph.node)
    data["layers"]["model.layers.0.mlp.down_proj"]["format"] = "int4-g128"
    edited.write_text(json.dumps(data))
    res = CliRunner().invoke(cli, ["export", "--provider", "cpu", "--run", str(run.path),
                                   "--plan", str(edited)])
    assert res.exit_code == 2 and "no int4-g128 qparams" in res.output
