"""The family registry: every description names modules its tiny model really has, the
quantizable layers are the checkpoint's own (fused ones included), and configs the exporter
cannot represent are refused from the config object alone, each naming its field."""

from __future__ import annotations

import pytest

from quantcal.errors import QuantcalError
from quantcal.families import (
    ACTIVATIONS, FAMILIES, Activation, Graph, check_config, family_for,
)
from quantcal.models import family_of, quantizable_layers
from tinymodels import ALL_FAMILIES, build_tiny_model, tiny_config


def test_every_family_has_a_tiny_model_and_one_description():
    names = [f.name for f in FAMILIES]
    assert len(set(names)) == len(names)
    assert {family_for(tiny_config(f).model_type).name for f in ALL_FAMILIES} == set(names)
    assert set(ACTIVATIONS.values()) == set(Activation)


def _described_paths(model) -> list[str]:
    fam = family_of(model)
    att, mlp, norms = fam.attention, fam.mlp, fam.norms
    paths = [fam.embedding, fam.final_norm, fam.lm_head]
    for i in range(model.config.num_hidden_layers):
        projections = [att.qkv] if att.qkv else [att.q, att.k, att.v]
        paths += [fam.attn(i, p) for p in (*projections, att.o)]
        paths += [fam.attn(i, n) for n in (att.q_norm, att.k_norm) if n]
        if fam.graph is Graph.ROTARY:
            gated = [mlp.gate_up] if mlp.gate_up else [mlp.gate, mlp.up]
            paths += [fam.mlp_part(i, p) for p in (*gated, mlp.down)]
        paths += [fam.norm(i, n) for n in (norms.attn_in, norms.mlp_in, norms.attn_out,
                                           norms.mlp_out) if n]
    return paths


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_described_modules_exist(family):
    model = build_tiny_model(family)
    for path in _described_paths(model):
        model.get_submodule(path)  # raises AttributeError when the description is wrong
    assert check_config(model.config) is family_of(model)


def test_phi3_plans_name_the_fused_checkpoint_modules():
    layers = quantizable_layers(build_tiny_model("phi3"))
    assert "model.layers.0.self_attn.qkv_proj" in layers
    assert "model.layers.0.mlp.gate_up_proj" in layers
    assert not any(n.endswith((".q_proj", ".gate_proj")) for n in layers)


def test_gemma_embedding_fake_quant_keeps_its_scale():
    """Gemma's rows are scaled by sqrt(hidden) inside the embedding module that fake-quant
    replaces: the stand-in scales its dequantized rows the same way (the export multiplies
    after the gather), so a quantized Gemma table has a true torch reference."""
    import torch

    from quantcal.calibrate.qparams import compute_embedding_qparams
    from quantcal.fakequant import fake_quant_module, layer_qparams, quantized_weight
    from quantcal.formats import parse_format

    model = build_tiny_model("gemma2")
    layers = quantizable_layers(model)
    assert "model.embed_tokens" in layers and "lm_head" in layers
    emb, fmt = model.get_submodule("model.embed_tokens"), parse_format("int8")
    table = emb.weight.detach()
    qp = layer_qparams(compute_embedding_qparams({"model.embed_tokens": table}, (fmt,),
                                                 method="rtn"), "model.embed_tokens", fmt)
    ids = torch.tensor([[1, 5, 9, 200]])
    expected = quantized_weight(fmt, table, qp)[ids] * model.config.hidden_size ** 0.5
    got = fake_quant_module(emb, fmt, qp)(ids)
    assert torch.allclose(got, expected, rtol=1e-6, atol=0)
    assert torch.allclose(got, emb(ids), rtol=0.05, atol=0.05)  # int8 of the real rows


@pytest.mark.parametrize("family, change, field", [
    ("llama", {"hidden_act": "quick_gelu"}, "hidden_act='quick_gelu'"),
    ("gemma2", {"hidden_activation": "relu2"}, "hidden_activation='relu2'"),
    ("mistral", {"num_local_experts": 8}, "num_local_experts=8"),
    ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
])
def test_unrepresentable_configs_are_refused(family, change, field):
    config = tiny_config(family)
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(QuantcalError, match="supported families") as err:
        check_config(config)
    assert field in str(err.value) and "\n" not in str(err.value)


def test_rope_types_and_partial_rotary_are_checked():
    config = tiny_config("llama")
    config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}
    with pytest.raises(QuantcalError, match="'dynamic'"):
        check_config(config)
    config = tiny_config("phi3")
    config.rope_parameters = {**config.rope_parameters, "partial_rotary_factor": 0.75}
    with pytest.raises(QuantcalError, match="partial_rotary_factor=0.75: 12 rotary dims of 16"):
        check_config(config)
    config.num_attention_heads, config.num_key_value_heads = 2, 1  # head_dim 32: 16 rotated
    config.rope_parameters = {**config.rope_parameters, "partial_rotary_factor": 0.5}
    check_config(config)
