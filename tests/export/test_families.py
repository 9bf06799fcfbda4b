"""Every exported family against HF's own model, independently of quantcal's parity check.

For tiny random models of each family (Llama with llama3 rope scaling, Qwen2, Qwen3,
Mistral with a sliding window, Gemma 2 and 3, Phi-3 with longrope, GPT-2): the fp32 ONNX
logits equal HF's over prompts around and well past the sliding window and the original
rope length; decoding with the KV cache equals HF's own cached decoding across both; and
``quantcal calibrate -> plan -> export`` passes for an all-fp16 and a quantized plan, the
fp16 one again checked against HF. A config the exporter cannot represent exactly (MoE,
encoder, dynamic rope, an activation it cannot emit) is refused before any weight is read.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from quantcal.cli import cli
from quantcal.export.builder import save_model
from quantcal.export.emit import graph_op_counts, planned_op_counts
from quantcal.export.graphs import build_decoder
from quantcal.formats import FP16
from quantcal.models import quantizable_layers
from quantcal.plancheck import resolved_formats
from quantcal.rundir import EXPORT_JSON, MODEL, RunDir
from tinymodels import (
    ALL_FAMILIES, FAMILIES, ORIGINAL_POSITIONS, WINDOW, OnnxDecoder, build_tiny_model,
    tiny_config,
)

NEW = tuple(f for f in ALL_FAMILIES if f not in FAMILIES)
LONG = 100  # past every window and original rope length of the tiny configs
LENGTHS = (WINDOW - 1, WINDOW, WINDOW + 1, 2 * WINDOW, 2 * WINDOW + 1, LONG)


def _tol(ref: np.ndarray) -> float:
    return 1e-3 + 1e-4 * float(np.abs(ref).max())  # the export's fp32 rule


class _Graph(OnnxDecoder):
    """An fp32 ONNX export of ``model`` (every layer fp16-planned: float weights)."""

    def __init__(self, model, path):
        formats = {n: FP16() for n, i in quantizable_layers(model).items()
                   if i.kind != "embedding"}
        save_model(build_decoder(model, formats, {}, np.float32).model(), path)
        super().__init__(path)


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 512, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_fp32_logits_equal_hf_across_windows(family, tmp_path):
    """Prefill logits at every position, for prompts just under, at and past the sliding
    window (HF keeps ``window`` keys, the query's own included) and the original rope
    length (Phi-3's longrope switches to its long factors past it), up to 100 tokens."""
    model = build_tiny_model(family)
    graph = _Graph(model, tmp_path / "m.onnx")
    for n in LENGTHS:
        ids = _ids(n, seed=n)
        with torch.no_grad():
            ref = model(ids).logits.numpy()
        err = np.abs(graph.run(ids.numpy())[0] - ref).max(axis=(0, 2))  # (n,)
        bad = np.nonzero(err > _tol(ref))[0]
        assert not bad.size, f"{family}, {n} tokens: positions {bad[:5]} off by {err.max():.3g}"


def test_partial_rotary_equals_hf(tmp_path):
    """Phi-4-mini rotates 3/4 of each head; here half of a 32-dim head, long factors on."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("phi3")
    config.num_attention_heads, config.num_key_value_heads, half = 2, 1, 8
    config.rope_parameters = {**config.rope_parameters, "partial_rotary_factor": 0.5,
                              "short_factor": [1.0] * half, "long_factor": [2.0] * half}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = _ids(LONG)
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    out = _Graph(model, tmp_path / "m.onnx").run(ids.numpy())[0]
    assert np.abs(out - ref).max() <= _tol(ref)


@pytest.mark.parametrize("family, change", [
    ("qwen2", {}),  # q/k/v biases (HF initializes them to zero: randomized below)
    ("llama", {"attention_bias": True, "mlp_bias": True, "hidden_act": "gelu"}),  # erf
    ("qwen3", {"attention_bias": True, "hidden_act": "relu"}),
])
def test_biases_and_activations_equal_hf(family, change, tmp_path):
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    for key, value in change.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
    assert biases
    with torch.no_grad():
        for p in biases:
            p.normal_(std=0.5)
    ids = _ids(2 * WINDOW)
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    out = _Graph(model, tmp_path / "m.onnx").run(ids.numpy())[0]
    assert np.abs(out - ref).max() <= _tol(ref)


@pytest.mark.parametrize("family", [f for f in NEW if f != "llama3"])
def test_cached_decoding_equals_hf_cached_decoding(family, tmp_path):
    """Prefill 8 tokens, then one token per step with the cache, across the window and the
    original rope length, against HF's own cached decoding step by step (HF's longrope
    keeps the keys cached with the short factors too)."""
    model = build_tiny_model(family)
    graph = _Graph(model, tmp_path / "m.onnx")
    ids = _ids(2 * ORIGINAL_POSITIONS + 4, seed=7)
    with torch.no_grad():
        out = model(ids[:, :8], use_cache=True)
        logits, cache = graph.run(ids[:, :8].numpy())
        np.testing.assert_allclose(logits, out.logits.numpy(), atol=_tol(out.logits.numpy()))
        for t in range(8, ids.shape[1]):
            out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            logits, cache = graph.run(ids[:, t:t + 1].numpy(), cache)
            ref = out.logits.numpy()
            assert np.abs(logits - ref).max() <= _tol(ref), f"{family}: step {t}"


def _ok(args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def family_dir(request, tmp_path_factory, tiny_tokenizer):
    out = tmp_path_factory.mktemp(f"tiny-{request.param}")
    build_tiny_model(request.param).save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("family_dir", NEW, indirect=True)
def test_calibrate_plan_export_every_family(family_dir, tmp_path, sample_data, c4_file):
    """One calibration; an all-fp16 plan (checked against HF's logits over 100 tokens) and
    a quantized plan (quantcal's parity, and exactly the nodes the plan names)."""
    run = RunDir(tmp_path / "run")
    _ok(["calibrate", "--model", family_dir, "--data",
         c4_file, "--samples", "4", "--seq-len", "32",
         "--batch-size", "2", "--formats", "int4-g32,int8", "--target-bits", "6",
         "--sensitivity", "fast", "--sensitivity-samples", "2", "--run", run.path])
    _ok(["export", "--provider", "cpu", "--run", run.path])  # the calibrated (quantized) plan
    assert json.loads(run.file(EXPORT_JSON).read_text())["passed"]
    import onnx

    record = run.read_run()
    formats = resolved_formats(run.read_plan(), record, ["int4-g32", "int8"])
    assert {f.name for f in formats.values()} != {"fp16"}
    graph = onnx.load(str(run.file(MODEL)), load_external_data=False)
    embeddings = {n for n, i in record.layers.items() if i.kind == "embedding"}
    fused = json.loads(run.file(EXPORT_JSON).read_text())["fused"]
    assert graph_op_counts(graph, formats, fused) == planned_op_counts(formats, embeddings,
                                                                       fused)

    plan, fp = tmp_path / "fp16.json", tmp_path / "fp16" / "fp16.onnx"
    _ok(["plan", "--run", run.path, "--keep", "*", "--no-measure", "-o", plan])
    _ok(["export", "--provider", "cpu", "--run", run.path, "--plan", plan, "-o", fp])
    assert json.loads((fp.parent / "fp16.export.json").read_text())["passed"]
    sess = OnnxDecoder(fp)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(family_dir).eval()
    ids = _ids(LONG, seed=3)
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    assert np.abs(sess.run(ids.numpy())[0] - ref).max() <= _tol(ref)

    # eval: the quantized export scores; the fp16-plan export scores as HF's torch model does
    common = ["--run", run.path, "--tasks", "hellaswag", "--limit", "4", "--provider", "cpu",
              "--data-dir", sample_data]
    _ok(["eval", *common])
    _ok(["eval", fp, *common, "--baseline"])
    variants = json.loads(run.file("eval.json").read_text())["variants"]
    assert len(variants) == 3, list(variants)
    fp_row = next(v for k, v in variants.items() if k.startswith("onnx") and v["source"]
                  != "model.onnx")
    base = next(v for k, v in variants.items() if k.startswith("baseline"))
    assert (fp_row["metrics"]["hellaswag"]["acc_norm"][0]
            == base["metrics"]["hellaswag"]["acc_norm"][0])


def _config_only(tmp_path, name, config) -> str:
    folder = tmp_path / name
    config.save_pretrained(folder)  # config.json only: no weights to read
    return str(folder)


def _refusals(tmp_path):
    from transformers import BertConfig, LlamaConfig, MistralConfig, MixtralConfig

    small = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4)
    yield "mixtral", MixtralConfig(**small, num_local_experts=4), "'mixtral'"
    yield "bert", BertConfig(**small), "'bert'"
    yield "moe-mistral", MistralConfig(**small, num_local_experts=4), "num_local_experts=4"
    yield "dynamic", LlamaConfig(**small, rope_parameters=dict(
        rope_type="dynamic", rope_theta=10000.0, factor=2.0)), "'dynamic'"
    yield "act", LlamaConfig(**small, hidden_act="gelu_fast"), "hidden_act='gelu_fast'"


def test_unsupported_configs_are_refused_before_loading(tmp_path, c4_file):
    for name, config, field in _refusals(tmp_path):
        folder = _config_only(tmp_path, name, config)
        res = CliRunner().invoke(cli, [
            "calibrate", "--model", folder, "--data",
            c4_file, "--run",
            str(tmp_path / f"run-{name}")])
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1, (name, res.output)
        assert field in lines[0] and "supported families: llama" in lines[0], lines[0]
        assert not (tmp_path / f"run-{name}").exists()


@pytest.mark.parametrize("family_dir", ["gemma2"], indirect=True)
def test_torch_backend_scores_a_new_family_and_any_causal_lm(family_dir, tmp_path,
                                                             sample_data, tiny_tokenizer):
    """The torch evaluation backend runs a task on Gemma 2, and loads a causal LM quantcal
    does not export (a tiny Mixtral) without the family check."""
    from quantcal.evaluate.backends import TorchBackend
    from quantcal.evaluate.evaluator import run_task
    from transformers import AutoModelForCausalLM, MixtralConfig

    backend = TorchBackend.from_pretrained(str(family_dir), "cpu", torch.float32)
    metrics, docs = run_task("hellaswag", backend, data_dir=sample_data, limit=2, sample=None,
                             seed=0, progress=False)
    assert docs == 2 and 0.0 <= metrics["acc_norm"][0] <= 1.0
    torch.manual_seed(0)
    moe = AutoModelForCausalLM.from_config(MixtralConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2, pad_token_id=0))
    moe.save_pretrained(tmp_path / "moe")
    tiny_tokenizer.save_pretrained(tmp_path / "moe")
    logp = TorchBackend.from_pretrained(str(tmp_path / "moe"), "cpu").token_logprobs([1, 2, 3])
    assert logp.shape == (2,) and np.isfinite(logp).all()
