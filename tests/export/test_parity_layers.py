"""Per-layer parity: every planned layer's emitted op(s), alone in onnxruntime on the input
the torch fake-quant model gives it, against the fake-quant module; and an export whose
emitter gets one layer wrong fails naming that layer and its format.

The tiny models have SmolLM2-like widths that no group divides (hidden 96 with groups of
64 and 128, MLP 160), so every block format has a partial last group, and a tied head whose
table the embedding shares (even block counts) or stores apart (odd asymmetric int4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantcal.calibrate import weights
from quantcal.export import emit
from quantcal.export.builder import save_model
from quantcal.export.graphs import build_decoder
from quantcal.export.layer_parity import LAYER_KEY, layer_errors
from quantcal.export.parity import LAYER_DISAGREES, check_parity, failure_detail
from quantcal.formats import BlockQuant, parse_format
from quantcal.models import quantizable_layers, weight_matrix
from tinymodels import tiny_config

FORMATS = ["int8", "int4-g64", "int4-g128", "int4-g32", "int8-g32", "int4-g64-sym", "w8a8"]
WRONG = "model.layers.1.mlp.down_proj"


def _model(family: str = "qwen2"):
    """A tiny tied-head model of hidden 96 and MLP 160 (partial groups everywhere)."""
    import transformers

    cfg = tiny_config(family)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads = 96, 160, 6  # head_dim 16
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _plan(model, embedding: str) -> tuple[dict, dict]:
    """Formats (cycling through :data:`FORMATS`, the head and embedding as given) and
    min/max qparams for them (w8a8 with a static activation scale)."""
    layers = quantizable_layers(model)
    formats, qparams = {}, {}
    for i, (name, info) in enumerate(layers.items()):
        text = embedding if info.kind == "embedding" or name == "lm_head" else FORMATS[
            i % len(FORMATS)]
        fmt = formats[name] = parse_format(text)
        module = model.get_submodule(name)
        w = (module.weight if info.kind == "embedding" else weight_matrix(module)).detach()
        if isinstance(fmt, BlockQuant):
            s, z = weights.rtn(w, fmt.bits, fmt.group_size, fmt.symmetric)
        else:  # w8a8
            s, z = weights.rtn(w, 8, None, True)
            qparams[f"{name}/act/scale"], qparams[f"{name}/act/zero"] = (
                torch.tensor(0.05), torch.tensor(128.0))
        qparams[f"{name}/{fmt.name}/scale"], qparams[f"{name}/{fmt.name}/zero"] = s, z
    return formats, qparams


@pytest.mark.parametrize("embedding", ["int8", "int4-g64", "int4-g32", "int4-g128-sym"])
def test_every_layer_alone_matches_fake_quant(embedding):
    model = _model()
    formats, qparams = _plan(model, embedding)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    errors = layer_errors(model, formats, qparams, ids, dtype=np.float32, provider="cpu")
    assert set(errors) == set(formats)  # embedding and head included
    for name, (err, ref) in errors.items():
        assert ref > 0 and err <= 1e-5 * ref, (name, formats[name].name, err, ref)


def _wrong_last_group(original):
    """An emitter bug in one layer: the codes of WRONG's partial last group are off by one."""
    def pack(layer, fmt, w, qp):
        if layer == WRONG:
            from quantcal import qmath

            q = qmath.quantize_weight(w, qp["scale"], qp["zero"], fmt.bits, fmt.group_size)
            q[:, -(w.shape[1] % fmt.group_size):] ^= 1
            qp = {**qp, "codes": q}
        return original(layer, fmt, w, qp)
    return pack


def test_a_wrong_layer_is_named(tmp_path, monkeypatch):
    model = _model()
    formats, qparams = _plan(model, "int8")
    formats[WRONG] = parse_format("int8")
    fmt = formats[WRONG]
    w = weight_matrix(model.get_submodule(WRONG)).detach()
    s, z = weights.rtn(w, fmt.bits, fmt.group_size, fmt.symmetric)
    qparams[f"{WRONG}/{fmt.name}/scale"], qparams[f"{WRONG}/{fmt.name}/zero"] = s, z
    monkeypatch.setattr(emit, "pack_block", _wrong_last_group(emit.pack_block))
    save_model(build_decoder(model, formats, qparams, np.float32).model(), tmp_path / "m.onnx")
    p = check_parity(tmp_path / "m.onnx", model, formats, qparams, provider="cpu",
                     dtype=np.float32)
    assert p["passed"] == 0.0
    assert p[f"{LAYER_KEY}{WRONG}"] == p["worst_layer_max_abs"] > 0
    assert p["worst_layer_rel"] > LAYER_DISAGREES[np.dtype(np.float32)] == p["layer_rel_tolerance"]
    detail = failure_detail(p, {n: f.name for n, f in formats.items()})
    assert f"layer {WRONG} (int8) disagrees" in detail


def test_failure_detail_says_when_every_layer_agrees():
    figures = {"worst_layer/model.layers.0.mlp.up_proj": 1e-6, "worst_layer_rel": 1e-6,
               f"{LAYER_KEY}model.layers.0.mlp.up_proj": 3e-5, "torch_fp32_max_abs": 0.002,
               "long_passed": 0.0, "long_past_length": 8208.0, "long_logits_max_abs": 0.5,
               "long_tolerance": 0.004, "padded_passed": 1.0}
    detail = failure_detail(figures, {"model.layers.0.mlp.up_proj": "int4-g64"})
    assert "after a past of 8208 positions the logits are 0.5 off" in detail
    assert "every planned layer agrees with torch on its own (worst " \
           "model.layers.0.mlp.up_proj (int4-g64)" in detail
    assert "0.002 from float64" in detail and "right-padded" not in detail
