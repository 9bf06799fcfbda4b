"""Exact sensitivity: the block-wise, format-batched computation equals the naive one (whole
model, one layer fake-quantized at a time); the proxy and its rank correlation."""

from __future__ import annotations

import pytest
import torch

from tinymodels import build_tiny_model
from quantcal.calibrate.collect import collect_full
from quantcal.calibrate.qparams import compute_qparams
from quantcal.calibrate.sensitivity import (
    exact_sensitivity, output_fisher, proxy_sensitivity, spearman,
)
from quantcal.calibrate import sensitivity
from quantcal.fakequant import act_qparams, fake_quant_module, layer_qparams, swapped
from quantcal.formats import W8A8, Int4, Int8
from quantcal.models import quantizable_layers, weight_matrix

CPU = torch.device("cpu")
FORMATS = (Int8(), Int4(32), W8A8())


def _setup(family):
    model = build_tiny_model(family)
    g = torch.Generator().manual_seed(5)
    calib = torch.randint(0, 512, (6, 24), generator=g)
    held = torch.randint(0, 512, (3, 24), generator=g)
    layers = {n: i for n, i in quantizable_layers(model).items() if i.kind != "embedding"}
    modules = {n: model.get_submodule(n) for n in layers}
    stats = collect_full(model, calib, modules, batch_size=3, device=CPU, progress=False)
    weights = {n: weight_matrix(m).detach() for n, m in modules.items()}
    qparams = compute_qparams(weights, stats, FORMATS, observer="minmax", progress=False)
    return model, held, layers, stats, weights, qparams


@torch.no_grad()
def _naive(model, held, name, fmt, qparams):
    ref = torch.log_softmax(model(held, use_cache=False).logits.float(), -1)
    module = model.get_submodule(name)
    fq = fake_quant_module(module, fmt, layer_qparams(qparams, name, fmt),
                           act_qparams(qparams, name))
    with swapped(model, {name: fq}):
        logq = torch.log_softmax(model(held, use_cache=False).logits.float(), -1)
    return float((ref.exp() * (ref - logq)).sum(-1).mean())


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_blockwise_equals_naive(family):
    model, held, layers, _, _, qparams = _setup(family)
    scores = exact_sensitivity(model, held, layers, FORMATS, qparams, batch_size=2,
                               device=CPU, progress=False)
    assert scores.keys() == layers.keys()
    picks = [n for n in layers][:: max(1, len(layers) // 5)] + ["lm_head"]
    for name in picks:
        for fmt in FORMATS:
            naive = _naive(model, held, name, fmt, qparams)
            assert scores[name][fmt.name] == pytest.approx(naive, rel=1e-4, abs=1e-9), \
                (name, fmt.name)
            assert scores[name][fmt.name] >= -1e-6  # KL >= 0 up to float rounding
    # coarser formats hurt more on average
    mean = {f.name: sum(s[f.name] for s in scores.values()) for f in FORMATS}
    assert mean["int4-g32"] > mean["int8"]


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_blockwise_equals_naive_with_sliding_layers_and_soft_capping(family):
    """Windows of 40 tokens against a sliding window of 16: each block needs its own mask
    (and Gemma 3 its own rotary tables), and Gemma 2's logits are soft-capped; weights
    scaled up so that the KLs stand well above float noise."""
    model = build_tiny_model(family)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    g = torch.Generator().manual_seed(4)
    calib, held = torch.randint(0, 512, (2, 40), generator=g), torch.randint(0, 512, (2, 40),
                                                                          generator=g)
    layers = {n: i for n, i in quantizable_layers(model).items() if i.kind != "embedding"}
    modules = {n: model.get_submodule(n) for n in layers}
    stats = collect_full(model, calib, modules, batch_size=2, device=CPU, progress=False)
    qparams = compute_qparams({n: weight_matrix(m).detach() for n, m in modules.items()},
                              stats, (Int4(32),), observer="minmax", progress=False)
    scores = exact_sensitivity(model, held, layers, (Int4(32),), qparams, batch_size=2,
                               device=CPU, progress=False)
    for name in [n for n in layers if ".layers.1." in n] + ["lm_head"]:
        naive = _naive(model, held, name, Int4(32), qparams)
        assert naive > 1e-5, name
        assert scores[name]["int4-g32"] == pytest.approx(naive, rel=1e-3), name


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_fisher_proxy_ranks_like_exact(family):
    model, held, layers, stats, weights, qparams = _setup(family)
    exact = exact_sensitivity(model, held, layers, FORMATS[:2], qparams, batch_size=3,
                              device=CPU, progress=False)
    fisher = output_fisher(model, held, list(layers), batch_size=3, device=CPU)
    assert all(f.shape == (weights[n].shape[0],) and bool((f >= 0).all())
               for n, f in fisher.items())
    proxy = proxy_sensitivity(weights, stats, FORMATS[:2], qparams, fisher)
    rho = spearman(exact, proxy)
    assert rho > 0.7, rho


def test_rank_agreement_per_format_is_not_inflated_by_the_formats():
    """A proxy that ranks the layers backwards within each format still ranks int4 above
    int8: pooled, Spearman reads high; per format, across layers, it reads -1."""
    from scipy.stats import spearmanr

    layers = [f"model.layers.{i}.mlp.up_proj" for i in range(6)]
    exact = {n: {"int8": 0.01 * (i + 1), "int4-g32": 1.0 * (i + 1)} for i, n in enumerate(layers)}
    proxy = {n: {"int8": 0.01 * (6 - i), "int4-g32": 1.0 * (6 - i)} for i, n in enumerate(layers)}
    assert spearman(exact, proxy) > 0.5  # pooled: the format alone
    per = sensitivity.spearman_per_format(exact, proxy)
    assert per == {"int8": pytest.approx(-1.0), "int4-g32": pytest.approx(-1.0)}
    rng = torch.Generator().manual_seed(0)
    noisy = {n: {f: v * float(torch.rand((), generator=rng) + 0.5) for f, v in s.items()}
             for n, s in exact.items()}
    for fmt, rho in sensitivity.spearman_per_format(exact, noisy).items():
        ref = spearmanr([exact[n][fmt] for n in layers], [noisy[n][fmt] for n in layers])
        assert rho == pytest.approx(float(ref.statistic), abs=1e-12)
    flat = {n: {"int8": 0.5} for n in layers}  # a constant score has no rank correlation
    assert sensitivity.spearman_per_format(flat, flat) == {"int8": None}


def test_exact_sensitivity_holds_one_layers_candidates_at_a_time(monkeypatch):
    """Peak memory: the quantized copies alive at any moment are one layer's (one per
    format), not every layer's times the formats, which at 8B was about 48 GB for three
    formats. Counted by weak references to every copy fake_quant_module makes."""
    import gc
    import weakref

    model, held, layers, _, _, qparams = _setup("llama")
    alive: list[weakref.ref] = []
    most = [0]

    def counting(*args, **kwargs):
        gc.collect()
        now = sum(r() is not None for r in alive)
        most[0] = max(most[0], now + 1)
        copy = fake_quant_module(*args, **kwargs)
        alive.append(weakref.ref(copy))
        return copy

    monkeypatch.setattr(sensitivity, "fake_quant_module", counting)
    exact_sensitivity(model, held, layers, FORMATS, qparams, batch_size=2, device=CPU,
                      progress=False)
    assert len(alive) >= len(layers) * len(FORMATS)
    assert most[0] <= len(FORMATS), most[0]
