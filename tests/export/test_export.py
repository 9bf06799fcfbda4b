"""`quantcal export` on tiny Llama, Qwen2 and GPT-2 models: the ONNX logits match torch
(fp32, and the plan's fake-quant), KV-cache decoding equals recomputation, and the graph
holds exactly the quantized nodes the plan names; a quantized token embedding (tied head
stored with it, or apart) too, with the plan's predicted size that of the file."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from quantcal.cli import cli
from quantcal.export.builder import node_prefix
from quantcal.export.emit import graph_op_counts, planned_op_counts
from quantcal.formats import shares_tied_weight
from quantcal.plancheck import resolved_formats
from quantcal.rundir import EXPORT_JSON, MODEL, PLAN, RunDir


def _calibrate(model_dir, run, data, *extra):
    res = CliRunner().invoke(cli, [
        "calibrate", "--model", str(model_dir), "--data", data, "--samples", "4", "--seq-len",
        "32", "--batch-size", "2", "--sensitivity", "fast", "--sensitivity-samples", "2",
        "--run", str(run), *extra])
    assert res.exit_code == 0, res.output
    return RunDir(run)


def _embeddings(record) -> set[str]:
    return {n for n, i in record.layers.items() if i.kind == "embedding"}


@pytest.fixture
def c4(c4_file):
    return c4_file


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
    record = run.read_run()
    formats = resolved_formats(run.read_plan(), record, ["int8", "int4-g32", "w8a8"])
    graph = onnx.load(str(run.file(MODEL)), load_external_data=False)
    fused = json.loads(run.file(EXPORT_JSON).read_text())["fused"]
    assert graph_op_counts(graph, formats, fused) == planned_op_counts(
        formats, _embeddings(record), fused)
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


@pytest.fixture(scope="module")
def embedding_run(tiny_model_dir, tmp_path_factory, c4_file):
    """A run of each family with int4-g32 and int4-g64 qparams (hidden 64: one g64 block)."""
    run = tmp_path_factory.mktemp("embedding") / "run"
    return _calibrate(tiny_model_dir, run, c4_file,
                      "--formats", "int4-g32,int4-g64", "--target-bits", "16")


def _stored_fp16_bytes(graph: onnx.ModelProto) -> int:
    """Initializer bytes as the fp16 (GPU) export stores them: uint8 tables as they are,
    float tensors at 2 bytes; the rotary caches and int64 constants are no parameters."""
    total = 0
    for init in graph.graph.initializer:
        size = int(np.prod(init.dims)) if init.dims else 1
        if init.data_type == onnx.TensorProto.UINT8:
            total += size
        elif init.data_type == onnx.TensorProto.FLOAT and init.name not in ("cos_cache",
                                                                           "sin_cache"):
            total += 2 * size
    return total


@pytest.mark.parametrize("emb_fmt, head_fmt", [
    ("int4-g32", "int4-g32"),  # tied: one packed table for GatherBlockQuantized and MatMulNBits
    ("int4-g32", "fp16"),  # tied: the head gets its own fp16 weight
    ("int4-g64", "int4-g64"),  # one asymmetric block per row: padded table, stored apart
])
def test_quantized_embedding_export(embedding_run, tmp_path, emb_fmt, head_fmt):
    run, record = embedding_run, embedding_run.read_run()
    (emb,) = _embeddings(record)
    rules = ["--force", f"{emb}={emb_fmt}"] + (
        ["--keep", "lm_head"] if head_fmt == "fp16" else ["--force", f"lm_head={head_fmt}"])
    plan_path, model_path = tmp_path / "plan.json", tmp_path / "model.onnx"
    res = CliRunner().invoke(cli, ["plan", "--run", str(run.path), "--target-bits", "16",
                                   "--no-measure", "-o", str(plan_path), *rules])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["export", "--provider", "cpu", "--run", str(run.path),
                                   "--plan", str(plan_path), "-o", str(model_path)])
    assert res.exit_code == 0, res.output
    parity = json.loads((tmp_path / EXPORT_JSON).read_text())["parity"]  # its own record
    assert parity["passed"] and parity["greedy_match"] == 1.0
    plan = run.read_plan(plan_path)
    formats = resolved_formats(plan, record, ["int4-g32", "int4-g64"])
    graph = onnx.load(str(model_path), load_external_data=False)
    fused = json.loads((tmp_path / EXPORT_JSON).read_text())["fused"]
    assert graph_op_counts(graph, formats, fused) == planned_op_counts(formats, {emb}, fused)
    assert any(n.name == f"{node_prefix(emb)}/GatherBlockQuantized" for n in graph.graph.node)
    shared = record.tied_lm_head and shares_tied_weight(
        formats[emb], formats["lm_head"], record.layers[emb].in_features)
    assert shared == (record.tied_lm_head and emb_fmt == head_fmt == "int4-g32")
    inits = {i.name for i in graph.graph.initializer}
    assert bool({"lm_head.weight", "lm_head.weight_q"} & inits) != shared
    if shared:
        (head,) = [n for n in graph.graph.node if n.name == "/lm_head/MatMulNBits"]
        assert head.input[1] == f"{emb}.weight_q"
    # to the byte, but for the first RMSNorm's two scalar constants
    assert 0 <= _stored_fp16_bytes(graph) - plan.predicted_size_bytes <= 4


def test_fp16_export_with_a_quantized_table(embedding_run, tmp_path):
    """The fp16 graph (``--provider cuda``: fp16 scales for GatherBlockQuantized and the head's
    MatMulNBits), verified on the CPU provider, which runs it too."""
    from quantcal.export.api import export_onnx

    (emb,) = _embeddings(embedding_run.read_run())
    plan_path = tmp_path / "plan.json"
    res = CliRunner().invoke(cli, ["plan", "--run", str(embedding_run.path), "--target-bits",
                                   "16", "--no-measure", "-o", str(plan_path), "--force",
                                   f"{emb}=int4-g32", "--force", "lm_head=int4-g32"])
    assert res.exit_code == 0, res.output
    out = export_onnx(embedding_run, plan_path=plan_path, provider="cuda",
                      verify_provider="cpu", output=tmp_path / "model.onnx")
    assert out.passed and out.dtype == "float16"
    assert out.ops["GatherBlockQuantized.bits4"] == 1 and out.ops["MatMulNBits.bits4"] == 1


def test_tied_fp16_head_is_stored_once(tmp_path):
    """A tied fp16 lm_head and the embedding share one (H, V) initializer: the head's
    MatMul reads it as it is, the embedding gathers columns (no per-step transpose)."""
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
    table = next(i for i in graph.graph.initializer if i.name == "model.embed_tokens.weight")
    assert list(table.dims) == [model.config.hidden_size, model.config.vocab_size]
    head = [n for n in graph.graph.node if n.name.startswith("/lm_head/")]
    assert head[0].op_type == "MatMul" and "model.embed_tokens.weight" in head[0].input
    emb = [n.op_type for n in graph.graph.node if n.name.startswith("/model/embed_tokens/")]
    assert emb == ["Gather", "Transpose"]
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
