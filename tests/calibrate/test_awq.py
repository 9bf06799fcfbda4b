"""AWQ scales (calibrate/awq.py): the fold leaves the FP model's function unchanged for every
family, the search picks the alpha a brute-force evaluation in this file finds best, AWQ
beats plain int4 RTN on a layer with outlier input channels, and a `calibrate --awq` run
exports a model that matches an independent reconstruction (folded here, fake-quantized by
quantcal.fakequant)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from quantcal.calibrate import awq
from quantcal.cli import cli
from quantcal.config import CalibrateConfig
from quantcal.errors import QuantcalError
from quantcal.fakequant import fake_quant_modules, swapped
from quantcal.formats import Int4, parse_formats
from quantcal.models import blocks_of, family_of, load_model, weight_matrix
from quantcal.plancheck import resolved_formats
from quantcal.rundir import EXPORT_JSON, MODEL, QPARAMS, RunDir
from tinymodels import ALL_FAMILIES, OnnxDecoder, tiny_config

CPU = torch.device("cpu")
# the families above plus multi-head (kv heads == heads) variants, where v -> o folds too
FOLD_CASES = ALL_FAMILIES + ("llama-mha", "phi3-mha")
# Gemma's norm multiplies by (1 + w) in float32 whatever the model's dtype
FLOAT32_NORM = ("gemma2", "gemma3")


def _model(case: str) -> torch.nn.Module:
    """A float64 tiny model of ``case`` with random norm weights and biases (not 1 and 0)."""
    from transformers import AutoModelForCausalLM

    family, _, mha = case.partition("-")
    config = tiny_config(family)
    if mha:
        config.num_key_value_heads = config.num_attention_heads
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval().double()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model


def _logits(model, ids) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


def _groups(model) -> list[awq.ScaleGroup]:
    n = len(blocks_of(model, family_of(model)))
    return [g for i in range(n) for g in awq.scale_groups(model, i)]


@pytest.mark.parametrize("case", FOLD_CASES)
def test_fold_is_exact(case):
    model = _model(case)
    ids = torch.randint(1, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, ids)
    groups = _groups(model)
    blocks = model.config.num_hidden_layers
    gated = family_of(model).gated_mlp
    mha = model.config.num_attention_heads == getattr(
        model.config, "num_key_value_heads", model.config.num_attention_heads)
    assert len(groups) == blocks * (2 + mha + gated)
    gen = torch.Generator().manual_seed(2)
    for group in groups:  # far from 1: a wrong fold shows
        k = weight_matrix(model.get_submodule(group.layers[0])).shape[1]
        awq.fold_(model, group, torch.exp(torch.randn(k, generator=gen)))
    got = _logits(model, ids)
    tol = 1e-4 if case in FLOAT32_NORM else 1e-10
    assert torch.allclose(got, ref, rtol=tol, atol=tol * float(ref.abs().max())), (
        float((got - ref).abs().max()))
    norm = groups[0].prev  # the weights did change
    assert not torch.allclose(model.get_submodule(norm).weight,
                              _model(case).get_submodule(norm).weight)


@pytest.mark.parametrize("case", FOLD_CASES)
def test_search_folds_exactly_and_apply_repeats_it(case):
    """The searched model computes what the original did; apply_awq_ on a fresh copy gives
    the very same weights; each block's arguments replay the model (Gemma's alternate)."""
    model = _model(case)
    ids = torch.randint(1, 512, (4, 40), generator=torch.Generator().manual_seed(3))
    ref = _logits(model, ids)
    scales = awq.search_awq_(model, ids, Int4(32), batch_size=2, device=CPU, progress=False)
    tol = 1e-4 if case in FLOAT32_NORM else 1e-10
    assert torch.allclose(_logits(model, ids), ref, rtol=tol, atol=tol * float(ref.abs().max()))
    assert {k.rsplit("/", 2)[0] for k in scales} == {n for g in _groups(model) for n in g.layers}
    assert any(not torch.equal(s, torch.ones_like(s)) for s in scales.values())
    fresh = _model(case)
    assert awq.apply_awq_(fresh, scales) == len(_groups(fresh))
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name

    calls = awq.block_arguments(model, ids, batch_size=2, device=CPU)
    hidden = [c.args[0] for c in calls[0]]
    for i, block in enumerate(blocks_of(model, family_of(model))):
        with torch.inference_mode():
            hidden = [awq._first(block(h, *c.args[1:], **c.kwargs))
                      for h, c in zip(hidden, calls[i])]
    with torch.inference_mode():
        last = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
        norm = model.get_submodule(family_of(model).final_norm)
        assert torch.allclose(norm(torch.cat(hidden)), last[-1], rtol=0, atol=1e-12)


def _rtn_numpy(w: np.ndarray, group: int) -> np.ndarray:
    """Asymmetric 4-bit min/max round-to-nearest per group of ``group`` columns, in numpy."""
    n, k = w.shape
    wg = w.reshape(n, k // group, group)
    lo = np.minimum(wg.min(-1, keepdims=True), 0)
    hi = np.maximum(wg.max(-1, keepdims=True), 0)
    scale = np.maximum((hi - lo) / 15, 1e-10)
    zero = np.clip(np.round(-lo / scale), 0, 15)
    q = np.clip(np.round(wg / scale) + zero, 0, 15)
    return ((q - zero) * scale).reshape(n, k)


def _outlier_layer(seed: int, k: int = 128, n: int = 48, t: int = 512):
    """A weight (N, K) and inputs (T, K) whose channels 3, 40, 77 and 100 are ~20x larger."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n, k)) * 0.05
    x = rng.normal(size=(t, k))
    x[:, [3, 40, 77, 100]] *= 20
    return w.astype(np.float32), x.astype(np.float32)


def _error(x, w, w_hat) -> float:
    x, w, w_hat = (np.asarray(a, np.float64) for a in (x, w, w_hat))
    return float(np.mean((x @ w.T - x @ w_hat.T) ** 2))


def test_search_matches_brute_force():
    w, x = _outlier_layer(0)
    found = awq.search_linear(torch.from_numpy(w), torch.from_numpy(x), Int4(32))
    x_mean = np.abs(x.astype(np.float64)).mean(0)
    rel = np.abs(w.astype(np.float64)).reshape(w.shape[0], -1, 32)
    rel = (rel / (rel.max(-1, keepdims=True) + 1e-6)).reshape(w.shape)
    w_mean = rel.mean(0)
    errors = {None: _error(x, w, _rtn_numpy(w, 32))}
    for alpha in [i / 20 for i in range(20)]:  # every candidate, independently of awq.py
        s = np.maximum(x_mean ** alpha / (w_mean ** (1 - alpha) + 1e-4), 1e-4)
        s = s / np.sqrt(s.max() * s.min())
        errors[alpha] = _error(x, w, _rtn_numpy(w * s, 32) / s)
    best = min(errors, key=errors.get)
    assert found.alpha is not None and best is not None  # the outliers make scaling pay
    assert errors[found.alpha] <= errors[best] * (1 + 1e-3), (found.alpha, best)
    assert set(found.losses) == set(errors)
    for alpha, loss in found.losses.items():  # the library's losses are the same errors
        assert loss == pytest.approx(errors[alpha], rel=2e-2)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_awq_beats_plain_int4_rtn_on_outlier_channels(seed):
    w, x = _outlier_layer(seed)
    found = awq.search_linear(torch.from_numpy(w), torch.from_numpy(x), Int4(32))
    s = found.scale.double().numpy()
    awq_err = _error(x, w, _rtn_numpy(w.astype(np.float64) * s, 32) / s)
    rtn_err = _error(x, w, _rtn_numpy(w.astype(np.float64), 32))
    assert awq_err < 0.5 * rtn_err, (awq_err, rtn_err)


def test_apply_refuses_scales_that_do_not_fit():
    model = _model("llama")
    scales = awq.search_awq_(model, torch.randint(1, 512, (2, 16)), Int4(32), batch_size=2,
                             device=CPU, progress=False)
    q = "model.layers.0.self_attn.q_proj/awq/scale"
    s = scales[q]
    with pytest.raises(QuantcalError, match="differ"):
        awq.apply_awq_(_model("llama"), {**scales, q: s * 2})
    with pytest.raises(QuantcalError, match="cannot fold"):
        awq.apply_awq_(_model("llama"), {**scales, "model.layers.0.mlp.gate/awq/scale": s})
    assert awq.apply_awq_(_model("llama"), {}) == 0


def test_a_resumed_step_folds_the_scales_it_found(tiny_llama_dir, tmp_path):
    """calibrate's checkpointed step: the second time it folds the kept scales, no search."""
    from quantcal.calibrate.api import Checkpoint

    config = CalibrateConfig(model=str(tiny_llama_dir), awq=True,
                             formats=parse_formats("int8,int4-g32"))
    run = RunDir(tmp_path / "run")
    windows = torch.randint(1, 512, (4, 16), generator=torch.Generator().manual_seed(4))
    searched, _ = load_model(str(tiny_llama_dir))
    scales = awq.awq_step_(Checkpoint(run, config, {}), searched, windows, config, CPU, False)
    ckpt = Checkpoint(run, config, {})
    assert ckpt.done("awq")
    resumed, _ = load_model(str(tiny_llama_dir))
    kept = awq.awq_step_(ckpt, resumed, windows[:, :2] * 0, config, CPU, False)
    assert kept.keys() == scales.keys()
    for (name, a), b in zip(searched.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def _fold_here(model, qparams: dict) -> None:
    """The Llama fold written out for this test: the norms and up rows ``/ s``, the
    consumers' columns ``* s``, from the run's ``{layer}/awq/scale``."""
    with torch.no_grad():
        for i, block in enumerate(model.model.layers):
            pre = f"model.layers.{i}."
            s_qkv = qparams[pre + "self_attn.q_proj/awq/scale"].double()
            s_mlp = qparams[pre + "mlp.gate_proj/awq/scale"].double()
            s_down = qparams[pre + "mlp.down_proj/awq/scale"].double()
            block.input_layernorm.weight.div_(s_qkv)
            for lin in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
                lin.weight.mul_(s_qkv)
            block.post_attention_layernorm.weight.div_(s_mlp)
            block.mlp.gate_proj.weight.mul_(s_mlp)
            block.mlp.up_proj.weight.mul_(s_mlp)
            block.mlp.up_proj.weight.div_(s_down[:, None])
            block.mlp.down_proj.weight.mul_(s_down)


def test_calibrate_awq_then_export_round_trip(tiny_llama_dir, tmp_path, c4_file):
    run = RunDir(tmp_path / "run")
    res = CliRunner().invoke(cli, [
        "calibrate", "--model", str(tiny_llama_dir), "--data", c4_file, "--samples", "4",
        "--seq-len", "32", "--batch-size", "2", "--sensitivity", "fast",
        "--sensitivity-samples", "2", "--formats", "int8,int4-g32", "--target-bits", "6",
        "--awq", "--run", str(run.path)])
    assert res.exit_code == 0, res.output
    record = run.read_run()
    assert record.config.awq and "awq_s" in record.timings
    qparams, meta = run.load_tensors(QPARAMS, "qparams")
    assert sum(k.endswith("/awq/scale") for k in qparams) == 2 * 6  # q, k, v, gate, up, down
    res = CliRunner().invoke(cli, ["export", "--provider", "cpu", "--run", str(run.path)])
    assert res.exit_code == 0, res.output
    assert RunDir(run.path).file(EXPORT_JSON).is_file()

    # the ONNX model against the original checkpoint folded here and fake-quantized
    model, _ = load_model(str(tiny_llama_dir), dtype=torch.float64)
    _fold_here(model, qparams)
    formats = resolved_formats(run.read_plan(), record, meta["formats"].split(","))
    assert any(f.name == "int4-g32" for f in formats.values())
    ids = np.random.default_rng(0).integers(1, 512, (2, 16))
    with swapped(model, fake_quant_modules(model, formats, qparams)), torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    got, _ = OnnxDecoder(run.file(MODEL)).run(ids)
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()
    # without the fold the same qparams give another model: the fold is what export applied
    plain, _ = load_model(str(tiny_llama_dir), dtype=torch.float64)
    with swapped(plain, fake_quant_modules(plain, formats, qparams)), torch.no_grad():
        unfolded = plain(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    assert np.abs(unfolded - ref).max() > 10 * np.abs(got - ref).max()


def test_awq_needs_a_weight_only_format(tiny_llama_dir, tmp_path, c4_file):
    res = CliRunner().invoke(cli, [
        "calibrate", "--model", str(tiny_llama_dir), "--data", c4_file, "--samples", "2",
        "--seq-len", "16", "--formats", "w8a8", "--awq", "--run", str(tmp_path / "run")])
    assert res.exit_code == 2
    assert "--awq" in res.output and "int4" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
