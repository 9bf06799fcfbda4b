"""calibrate.gptq, the block-by-block driver: its Hessians are those of the quantized model
(brute force: the whole model run with the dequantized codes substituted), its rounding
beats the clip search on the same data, it holds one group's Hessian at a time whatever
the depth, and it gives the model back untouched."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

from tinymodels import build_tiny_model, tiny_config
from quantcal import qmath
from quantcal.calibrate import weights
from quantcal.calibrate.data import calibration_windows
from quantcal.calibrate.gptq import gptq_qparams, layer_groups, propagation_format
from quantcal.errors import QuantcalError
from quantcal.fakequant import layer_qparams
from quantcal.formats import Int4, Int8, W8A8, parse_formats
from quantcal.models import family_of, quantizable_layers, weight_matrix

FORMATS = parse_formats("int8,int4-g32,int4-g64,w8a8")
CPU = torch.device("cpu")


def _modules(model) -> dict[str, nn.Module]:
    return {n: model.get_submodule(n) for n, i in quantizable_layers(model).items()
            if i.kind != "embedding"}


def _windows(n: int = 6, length: int = 20) -> torch.Tensor:
    return torch.randint(0, 512, (n, length), generator=torch.Generator().manual_seed(5))


def _run(model, windows, formats=FORMATS, **kw):
    """qparams and the Hessians GPTQ used, by group (copies)."""
    seen: dict[tuple[str, ...], torch.Tensor] = {}
    qp = gptq_qparams(model, windows, _modules(model), formats, batch_size=2, device=CPU,
                      progress=False, on_hessian=lambda names, h: seen.update(
                          {names: h.clone()}), **kw)
    return qp, seen


def _dequantized(model, qp, names) -> dict[str, torch.Tensor]:
    """The propagation format's dequantized weights of ``names``, from the codes written."""
    out = {}
    for name in names:
        w = weight_matrix(model.get_submodule(name)).detach()
        fmt = propagation_format((Int8(), Int4(32), Int4(64)), *w.shape)
        p = layer_qparams(qp, name, fmt)
        out[name] = qmath.dequantize_weight(p["codes"], p["scale"], p["zero"], fmt.group_size)
    return out


def _brute_force_hessian(model, windows, substitute: dict[str, torch.Tensor], layer: str
                         ) -> torch.Tensor:
    """X^T X / n of ``layer``'s input over the whole model run with ``substitute``'s weights
    in place (float64), no cache, no blocks."""
    saved = {n: model.get_submodule(n).weight.data for n in substitute}
    xs = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda _m, inp, _o: xs.append(inp[0].reshape(-1, inp[0].shape[-1]).double()))
    try:
        for name, w in substitute.items():
            model.get_submodule(name).weight.data = w.clone()
        with torch.no_grad():
            model(input_ids=windows, use_cache=False)
    finally:
        handle.remove()
        for name, w in saved.items():
            model.get_submodule(name).weight.data = w
    x = torch.cat(xs)
    return x.T @ x / x.shape[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_propagation_format_is_the_cheapest_candidate():
    assert propagation_format((Int8(), Int4(32), Int4(64)), 64, 64) == Int4(64)
    assert propagation_format((Int8(), Int4(32), Int4(64), Int4(128)), 64, 576) == Int4(64)
    assert propagation_format((Int4(64), Int4(64, symmetric=True)), 8, 128).symmetric


def test_hessians_come_from_the_quantized_model():
    """Block 1's Hessians (and, within a block, o_proj's, gate/up's and down_proj's) are
    X^T X / n of the inputs the model produces with every layer before them replaced by its
    dequantized codes; the FP model's inputs give measurably different ones."""
    model, windows = build_tiny_model("llama"), _windows()
    qp, seen = _run(model, windows)
    family = family_of(model)
    groups = [tuple(g) for i in range(2) for g in layer_groups(family, i, _modules(model))]
    assert list(seen) == groups + [("lm_head",)]
    assert len(groups) == 8 and groups[0] == tuple(f"model.layers.0.self_attn.{p}_proj"
                                                   for p in "qkv")
    done: list[str] = []
    for names in groups:
        expected = _brute_force_hessian(model, windows, _dequantized(model, qp, done), names[0])
        fp = _brute_force_hessian(model, windows, {}, names[0])
        assert _rel(seen[names], expected) < 1e-5, names
        if done:  # something quantized feeds it: the test can tell
            assert _rel(fp, expected) > 100 * _rel(seen[names], expected), names
        done += names
    head = _brute_force_hessian(model, windows, _dequantized(model, qp, done), "lm_head")
    assert _rel(seen[("lm_head",)], head) < 1e-5


def test_the_model_comes_back_untouched():
    model = build_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _run(model, _windows(), act_order=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "gemma2"])  # each grouping
def test_every_family_has_codes_for_every_block_format(family):
    model = build_tiny_model(family)
    qp, seen = _run(model, _windows(4, 16))
    for name, module in _modules(model).items():
        n, k = weight_matrix(module).shape
        for fmt in (Int8(), Int4(32), Int4(64)):
            p = layer_qparams(qp, name, fmt)
            assert p["codes"].shape == (n, k) and p["scale"].shape == (n, -(-k // fmt.group_size))
        assert not any(key.startswith(f"{name}/{W8A8().name}/") for key in qp)
    assert sum(len(names) for names in seen) == len(_modules(model))  # each layer, one group


@pytest.fixture(scope="module")
def calibrated(c4_texts, tiny_tokenizer):
    model = build_tiny_model("llama")
    windows, _ = calibration_windows(c4_texts[:200], tiny_tokenizer, seq_len=64, samples=16,
                                     seed=0, holdout=0)
    return model, windows


@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act-order"])
@pytest.mark.parametrize("fmt", [Int4(32), Int4(64, symmetric=True), Int8()], ids=str)
def test_gptq_beats_aware_clip_on_the_data_it_saw(calibrated, fmt, act_order):
    """Per layer, the output error on the (quantized-model) inputs GPTQ saw, tr(dW H dW^T),
    is below that of the activation-aware clip search rounding to nearest on the same H."""
    model, windows = calibrated
    qp, seen = _run(model, windows, formats=(fmt,), act_order=act_order)
    for names, h in seen.items():
        for name in names:
            w = weight_matrix(model.get_submodule(name)).detach()
            p = layer_qparams(qp, name, fmt)
            w_gptq = qmath.dequantize_weight(p["codes"], p["scale"], p["zero"], fmt.group_size)
            s, z = weights.aware_clip(w, torch.diag(h), fmt.bits, fmt.group_size,
                                      fmt.symmetric)
            w_clip = qmath.fake_quant_weight(w, s, z, fmt.bits, fmt.group_size)
            e_gptq, e_clip = _err(w, w_gptq, h), _err(w, w_clip, h)
            assert e_gptq < 0.9 * e_clip, (name, e_gptq, e_clip)


def _err(w, w_hat, h) -> float:
    d = (w - w_hat).double()
    return float(torch.einsum("nk,kl,nl->", d, h.double(), d))


def _deep_llama(blocks: int):
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.num_hidden_layers = blocks
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _peak_live_hessian_bytes(model) -> tuple[int, int]:
    """Bytes of the Hessians alive at once, at their worst, and how many there were: each
    Hessian GPTQ uses is followed by a weak reference, and when the next one arrives the
    still-alive ones are counted (the tensors themselves, not what the driver says)."""
    refs: list[tuple[weakref.ref, int]] = []
    peak = 0

    def watch(_names, h):
        nonlocal peak
        refs.append((weakref.ref(h), h.numel() * h.element_size()))
        peak = max(peak, sum(size for ref, size in refs if ref() is not None))

    gptq_qparams(model, _windows(4, 12), _modules(model), (Int4(32),), batch_size=2,
                 device=CPU, progress=False, on_hessian=watch)
    return peak, len(refs)


def test_one_hessian_alive_at_a_time_whatever_the_depth():
    """2 blocks or 8, the Hessians alive at once take the bytes of one group's (the largest:
    down_proj's, 128 x 128 fp32), never those of several groups or blocks."""
    shallow, n2 = _peak_live_hessian_bytes(_deep_llama(2))
    deep, n8 = _peak_live_hessian_bytes(_deep_llama(8))
    assert (n2, n8) == (2 * 4 + 1, 8 * 4 + 1)  # four groups a block, and the head
    assert shallow == deep == 128 * 128 * 4


def test_an_overflowing_input_is_one_error_naming_the_layer():
    model = build_tiny_model("llama")
    with torch.no_grad():  # finite, but down_proj's input overflows to inf
        model.get_submodule("model.layers.0.mlp.up_proj").weight.fill_(1e38)
    with pytest.raises(QuantcalError) as info:
        _run(model, _windows(4, 12))
    msg = str(info.value)
    assert "model.layers.0.mlp.down_proj" in msg and "block 0" in msg and "\n" not in msg
