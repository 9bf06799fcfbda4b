"""Export parity where short windows cannot see: far positions after a long past KV cache,
right-padded batches, left padding refused, bf16 checkpoints.

The far-position check hands torch (HF's ``DynamicCache``) and the graph the same
post-rotary past, sampled from the model's own cache; the first test pins that both caches
hold post-rotary keys, so the check compares like with like. A graph built without its
sliding window passes the 16-token windows and is caught only past the window.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from quantcal.cli import cli
from quantcal.export.builder import save_model
from quantcal.export.graphs import build_decoder
from quantcal.export.parity import _Decoder, _session, check_parity
from quantcal.export.parity_batch import LONG_LEN, long_past_length
from quantcal.formats import FP16
from quantcal.models import quantizable_layers
from quantcal.rundir import EXPORT_JSON, RunDir
from quantcal.runner import DecoderRunner
from tinymodels import ALL_FAMILIES, ORIGINAL_POSITIONS, WINDOW, build_tiny_model, tiny_config


def _export(model, path):
    """``model`` with every layer fp16, fp32 activations; returns the plan's formats."""
    formats = {n: FP16() for n in quantizable_layers(model)}
    save_model(build_decoder(model, formats, {}, np.float32).model(), path)
    return formats


@pytest.mark.parametrize("family", ["llama3", "qwen3", "gemma3"])
def test_graph_cache_holds_post_rotary_keys_like_hf(family, tmp_path):
    model = build_tiny_model(family)
    _export(model, tmp_path / "m.onnx")
    dec = _Decoder(_session(tmp_path / "m.onnx", "cpu"))
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    _, present = dec.run(ids.numpy(), dec.empty_cache(1))
    with torch.inference_mode():
        cache = model(ids, use_cache=True).past_key_values
    for i, layer in enumerate(cache.layers):
        np.testing.assert_allclose(present[f"past_key_values.{i}.key"], layer.keys.numpy(),
                                   atol=1e-5)
        np.testing.assert_allclose(present[f"past_key_values.{i}.value"],
                                   layer.values.numpy(), atol=1e-5)


def test_far_positions_go_past_rope_length_and_window():
    llama3, mistral = tiny_config("llama3"), tiny_config("mistral")
    assert long_past_length(llama3, 2, 16)[0] == 256 - LONG_LEN  # its positions cap it
    llama3.max_position_embeddings = 1 << 20
    llama3.rope_parameters["original_max_position_embeddings"] = 50_000
    p, wanted = long_past_length(llama3, 2, 16)
    assert p == wanted > 50_000  # beyond the original rope length
    mistral.sliding_window, mistral.max_position_embeddings = 60_000, 1 << 20
    p, wanted = long_past_length(mistral, 2, 16)
    assert p == wanted > 60_000  # beyond the window
    mistral.num_hidden_layers = 4096
    p, wanted = long_past_length(mistral, 8, 128)  # the byte cap binds
    assert 0 < p < wanted


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_family_passes_far_positions_and_padded_batches(family, tmp_path):
    model = build_tiny_model(family)
    formats = _export(model, tmp_path / "m.onnx")
    p = check_parity(tmp_path / "m.onnx", model, formats, {}, provider="cpu",
                     dtype=np.float32)
    assert p["passed"] == 1.0
    assert p["long_passed"] == 1.0 and p["long_past_length"] > 2 * WINDOW + ORIGINAL_POSITIONS
    assert p["padded_passed"] == 1.0
    assert p["long_logits_max_abs"] <= p["long_tolerance"]


def test_a_graph_without_its_sliding_window_fails_only_far_away(tmp_path):
    model = build_tiny_model("mistral")
    wrong = copy.deepcopy(model)
    wrong.config.sliding_window = None  # the graph attends to everything
    formats = _export(wrong, tmp_path / "m.onnx")
    p = check_parity(tmp_path / "m.onnx", model, formats, {}, provider="cpu",
                     dtype=np.float32)
    assert p["logits_max_abs"] <= p["tolerance"]  # 16-token windows cannot see it
    assert p["long_passed"] == 0.0 and p["long_logits_max_abs"] > 100 * p["long_tolerance"]
    assert p["passed"] == 0.0


def test_left_padding_is_unsupported_and_refused(tmp_path):
    """The graph takes positions from the mask's row sums (GroupQueryAttention), not from
    ``position_ids``: a left-padded row is wrong even with the positions it should have, so
    the runner refuses such masks."""
    model = build_tiny_model("llama")
    _export(model, tmp_path / "m.onnx")
    sess = _session(tmp_path / "m.onnx", "cpu")
    dec = _Decoder(sess)
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = np.ones((2, 10), np.int64)
    mask[1, :4] = 0
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask,
             "position_ids": np.maximum(np.cumsum(mask, 1) - 1, 0),
             "total_sequence_length": np.array(10, np.int32), **dec.empty_cache(2)}
    got = sess.run(["logits"], feeds)[0]
    with torch.inference_mode():
        alone = model(ids[1:, 4:]).logits.numpy()[0]
    assert np.abs(got[1, 4:] - alone).max() > 1e-2
    with pytest.raises(ValueError, match="right-padded"):
        DecoderRunner(sess, "cpu").prefill(ids.numpy(), mask)
    right = mask[:, ::-1].copy()
    logits = DecoderRunner(sess, "cpu").prefill(ids.numpy(), right)
    np.testing.assert_allclose(logits[1, :6], model(ids[1:, :6]).logits.detach()[0],
                               atol=1e-4)


def test_bf16_checkpoint_exports_and_verifies(tmp_path, c4_file, tiny_tokenizer):
    model = build_tiny_model("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    tiny_tokenizer.save_pretrained(tmp_path / "bf16")
    run = tmp_path / "run"
    c4 = c4_file
    res = CliRunner().invoke(cli, [
        "calibrate", "--model", str(tmp_path / "bf16"), "--data", c4, "--samples", "4",
        "--seq-len", "32", "--batch-size", "2", "--sensitivity", "fast",
        "--sensitivity-samples", "2", "--formats", "int8,int4-g32", "--target-bits", "6",
        "--run", str(run)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["export", "--provider", "cpu", "--run", str(run)])
    assert res.exit_code == 0, res.output
    parity = json.loads(RunDir(run).file(EXPORT_JSON).read_text())["parity"]
    assert parity["passed"] == 1.0 and parity["long_passed"] == 1.0
    assert parity["padded_passed"] == 1.0
