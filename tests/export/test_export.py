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


def test_tied_fp16_head_is_stored_once(tmp_path):
    """A tied fp16 lm_head reuses the embedding initializer (one copy on disk)."""
    import numpy as np

    from quantcal.export.builder import save_model
    from quantcal.export.decoder import build_llama
    from quantcal.formats import FP16
    from quantcal.models import quantizable_layers
    from tinymodels import build_tiny_model

    model = build_tiny_model("qwen2")  # its config ties the embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    formats = {n: FP16() for n, i in quantizable_layers(model).items() if i.kind != "embedding"}
    graph = build_llama(model, formats, {}, np.float32).model()
    names = [i.name for i in graph.graph.initializer]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    head = [n for n in graph.graph.node if n.name.startswith("/lm_head/")]
    assert [n.op_type for n in head][:2] == ["Transpose", "MatMul"]
    save_model(graph, tmp_path / "m.onnx")
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 512, (1, 8))
    cfg = model.config
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((1, 8), np.int64),
             "position_ids": np.arange(8)[None], "total_sequence_length": np.array(8, np.int32)}
    hd = cfg.hidden_size // cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        for k in ("key", "value"):
            feeds[f"past_key_values.{i}.{k}"] = np.zeros((1, cfg.num_key_value_heads, 0, hd),
                                                         np.float32)
    logits = sess.run(["logits"], feeds)[0]
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    assert np.abs(logits - ref).max() < 1e-4
