"""Fake quantization of the token embedding: its rows are the dequantized table, a head tied
to it keeps its own stand-in (modules are swapped, never the shared parameter), and an
embedding planned in its tied head's format uses the head's qparams (one matrix for both)."""

from __future__ import annotations

import pytest
import torch

from tinymodels import build_tiny_model
from quantcal import qmath
from quantcal.calibrate import weights
from quantcal.calibrate.qparams import compute_embedding_qparams
from quantcal.errors import QuantcalError
from quantcal.fakequant import (
    embedding_qparams, fake_quant_module, fake_quant_modules, layer_qparams, swapped,
)
from quantcal.formats import W8A8, Int4, Int8

EMB = "model.embed_tokens"
IDS = torch.tensor([[0, 5, 511, 5], [7, 300, 2, 1]])


def _qparams(model, formats) -> dict[str, torch.Tensor]:
    """Embedding qparams from the calibration code; the head's by round to nearest, so the
    two differ even in the same format."""
    out = compute_embedding_qparams({EMB: model.get_submodule(EMB).weight.detach()}, formats)
    for fmt in formats:
        scale, zero = weights.rtn(model.lm_head.weight.detach(), fmt.bits, fmt.group_size,
                                  fmt.symmetric)
        out[f"lm_head/{fmt.name}/scale"], out[f"lm_head/{fmt.name}/zero"] = scale, zero
    return out


def _dequantized(table, qp, fmt) -> torch.Tensor:
    return qmath.fake_quant_weight(table, qp["scale"], qp["zero"], fmt.bits, fmt.group_size)


def test_embedding_rows_are_the_dequantized_table():
    model = build_tiny_model("llama")
    table = model.model.embed_tokens.weight.detach()
    for fmt in (Int4(32), Int4(64, symmetric=True), Int8(32)):
        qp = layer_qparams(_qparams(model, (fmt,)), EMB, fmt)
        assert qp["scale"].shape == (512, 64 // fmt.group_size)  # groups along H
        fq = fake_quant_module(model.model.embed_tokens, fmt, qp)
        with torch.no_grad():
            rows = fq(IDS)
        assert rows.shape == (2, 4, 64)
        assert torch.equal(rows, _dequantized(table, qp, fmt)[IDS])
        assert not torch.equal(rows, table[IDS])  # the quantization is real


def test_tied_head_and_embedding_keep_their_own_fake_quant():
    model = build_tiny_model("qwen2")  # its config ties the head to the embedding
    emb, head = model.model.embed_tokens, model.lm_head
    assert head.weight is emb.weight
    original = emb.weight.detach().clone()
    formats = {EMB: Int4(32), "lm_head": Int8(32)}
    q = _qparams(model, (Int4(32), Int8(32)))
    with swapped(model, fake_quant_modules(model, formats, q)):
        with torch.no_grad():
            rows = model.model.embed_tokens(IDS)
        assert torch.equal(rows, _dequantized(original, layer_qparams(q, EMB, Int4(32)),
                                              Int4(32))[IDS])
        head_w = _dequantized(original, layer_qparams(q, "lm_head", Int8(32)), Int8(32))
        assert torch.equal(model.lm_head.weight, head_w)
    assert model.lm_head is head and model.model.embed_tokens is emb
    assert head.weight is emb.weight and torch.equal(emb.weight, original)


def test_embedding_in_its_tied_heads_format_uses_the_heads_qparams():
    fmt = Int4(32)
    tied, untied = build_tiny_model("qwen2"), build_tiny_model("llama")
    for model, source in ((tied, "lm_head"), (untied, EMB)):
        q = _qparams(model, (fmt,))
        assert not torch.equal(q[f"{EMB}/{fmt.name}/scale"], q[f"lm_head/{fmt.name}/scale"])
        formats = {EMB: fmt, "lm_head": fmt}
        chosen = embedding_qparams(model, EMB, formats, q)
        assert torch.equal(chosen["scale"], q[f"{source}/{fmt.name}/scale"])
        # a head in another format leaves the embedding its own qparams
        own = embedding_qparams(model, EMB, {EMB: fmt, "lm_head": Int8()}, q)
        assert torch.equal(own["scale"], q[f"{EMB}/{fmt.name}/scale"])
    mods = fake_quant_modules(tied, {EMB: fmt, "lm_head": fmt}, _qparams(tied, (fmt,)))
    with torch.no_grad():
        assert torch.equal(mods[EMB](IDS), mods["lm_head"].weight[IDS])  # one matrix


def test_embedding_errors():
    model = build_tiny_model("llama")
    with pytest.raises(QuantcalError, match="an embedding takes a weight-only format"):
        fake_quant_module(model.model.embed_tokens, W8A8(), {})
    with pytest.raises(QuantcalError, match="no int4-g64 qparams for model.embed_tokens"):
        fake_quant_modules(model, {EMB: Int4(64)}, _qparams(model, (Int4(32),)))
