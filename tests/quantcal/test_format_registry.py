"""The format registry: every concrete format has every piece; a format lacking one is
refused, naming exactly what it lacks (at import, for the export stage); and a tiny model
exported for a plan that uses every declared format matches an independent torch reference
written here from the formats' definitions (codes ``clamp(round(w / s) + z)`` per group of
K, ``(q - z) * s`` back; a w8a8 input rounded the same way with its static scale), not from
quantcal's fake-quant.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from dataclasses import dataclass, fields, replace

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import quantcal.formatdefs  # noqa: F401  (declares and checks every format first)
from quantcal.calibrate.qparams import compute_embedding_qparams, format_qparams
from quantcal.calibrate.stats import LayerStats
from quantcal.errors import QuantcalError
from quantcal.export.builder import save_model
from quantcal.export.emit import graph_op_counts, planned_op_counts
from quantcal.export.graphs import build_decoder
from quantcal.fakequant import quantized_weight
from quantcal.formats import FP16, W8A8, BlockQuant, Format, Int4, Int8, parse_format
from quantcal.formatspec import (
    CLASS_METHODS, FormatSpec, check_formats, concrete_formats, missing_pieces, spec_of, specs,
)
from quantcal.models import quantizable_layers
from tinymodels import OnnxDecoder, build_tiny_model

SPEC_FIELDS = [f.name for f in fields(FormatSpec)]
LINEAR_FIELDS = ["qparams", "fake_weight", "emit_linear", "linear_ops"]


def _ours() -> list[type[Format]]:
    return [t for t in concrete_formats() if t.__module__.startswith("quantcal.")]


def test_every_concrete_format_has_every_piece():
    assert set(_ours()) == set(specs()) == {FP16, Int4, Int8, W8A8}
    assert BlockQuant not in concrete_formats() and Format not in concrete_formats()
    for t in _ours():
        assert missing_pieces(t) == [], t
        assert (specs()[t].emit_embedding is not None) == t.embeddable
    check_formats(_ours())
    for text in ("fp16", "int8", "int8-g32-sym", "int4-g32", "int4-g128-sym", "w8a8"):
        assert type(parse_format(text)) in specs()


def test_a_format_lacking_pieces_is_named_with_exactly_those():
    @dataclass(frozen=True)
    class Int2(BlockQuant):  # a new block width: its class, no FormatSpec yet
        @property
        def weight_bits(self) -> int:
            return 2

        @property
        def name(self) -> str:
            return f"int2-g{self.group_size}"

    assert missing_pieces(Int2) == SPEC_FIELDS  # embeddable: the embedding handlers too
    assert missing_pieces(Int2, replace(specs()[Int4], emit_linear=None)) == ["emit_linear"]
    assert missing_pieces(Int2, specs()[Int4]) == []  # one entry completes it
    with pytest.raises(QuantcalError, match="no FormatSpec"):
        spec_of(Int2(32))
    with pytest.raises(QuantcalError) as exc:
        check_formats([Int2])
    assert f"Int2 lacks {', '.join(SPEC_FIELDS)} (its FormatSpec" in str(exc.value)

    @dataclass(frozen=True)
    class Bare(Format):  # a layout with a name and nothing else, not embeddable
        @property
        def name(self) -> str:
            return "bare"

    on_class = [m for m in CLASS_METHODS if m != "name"] + ["export_layout", "kernel_family"]
    assert missing_pieces(Bare) == on_class + LINEAR_FIELDS
    assert missing_pieces(Bare, specs()[W8A8]) == on_class

    @dataclass(frozen=True)
    class Int4Odd(Int4):  # a variant whose layout is no layout the export emits
        export_layout = "fpa_intb"

    assert missing_pieces(Int4Odd, specs()[Int4]) == ["export_layout"]

    @dataclass(frozen=True)
    class Family(Format, base=True):  # a family, not a format: never checked
        pass

    assert Family not in concrete_formats()


def test_a_format_lacking_a_piece_stops_the_export_stage_at_import():
    code = textwrap.dedent("""
        from dataclasses import dataclass
        from quantcal.formats import W8A8

        @dataclass(frozen=True)
        class W8A8Sym(W8A8):  # declared on the class, no FormatSpec
            pass

        import quantcal.export.fusion
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode != 0
    assert ("__main__.W8A8Sym lacks qparams, fake_weight, emit_linear, linear_ops "
            "(its FormatSpec, quantcal.formatdefs)") in res.stderr, res.stderr[-2000:]


# a plan of the tiny Llama (hidden 64, MLP 128) that uses every declared format, the
# embedding in a block format; block 0's and block 1's q/k/v share one (fused nodes)
PLAN = {"embed_tokens": "int4-g32", "0.self_attn.q_proj": "int4-g32",
        "0.self_attn.k_proj": "int4-g32", "0.self_attn.v_proj": "int4-g32",
        "0.self_attn.o_proj": "w8a8", "0.mlp.gate_proj": "int8", "0.mlp.up_proj": "int4-g64-sym",
        "0.mlp.down_proj": "int8-g32-sym", "1.self_attn.o_proj": "int8-g64",
        "1.mlp.gate_proj": "w8a8", "1.mlp.up_proj": "int4-g128", "1.mlp.down_proj": "w8a8",
        "lm_head": "int8-g32"}
ACT = (torch.tensor(0.05), torch.tensor(128.0))  # a static uint8 activation scale, zero


def _reference_weight(w: torch.Tensor, fmt: Format, qp: dict) -> torch.Tensor:
    """``w`` (N, K) through its codes and back, per group of K (w8a8: one group a row)."""
    if isinstance(fmt, FP16):
        return w
    bits, group = (8, w.shape[1]) if isinstance(fmt, W8A8) else (fmt.weight_bits,
                                                                 fmt.group_size)
    n, k = w.shape
    wg = F.pad(w, (0, -k % group)).reshape(n, -1, group)  # (N, G, group)
    s, z = qp["scale"].reshape(n, -1, 1), qp["zero"].reshape(n, -1, 1)  # (N, G, 1)
    q = (torch.round(wg / s) + z).clamp(0, 2 ** bits - 1)
    return ((q - z) * s).reshape(n, -1)[:, :k]


def _act_hook(module, args):
    s, z = ACT
    return ((torch.round(args[0] / s) + z).clamp(0, 255) - z) * s


def _plan(model) -> tuple[dict, dict]:
    formats, qparams = {}, {}
    for name, info in quantizable_layers(model).items():
        key = name.removeprefix("model.").removeprefix("layers.")
        fmt = formats[name] = parse_format(PLAN.get(key, "fp16"))
        w = model.get_submodule(name).weight.detach()
        if info.kind == "embedding":
            qparams |= compute_embedding_qparams({name: w}, (fmt,), method="rtn")
            continue
        stats = LayerStats(w.shape[1], w.shape[0], "cpu")
        qparams |= {f"{name}/{fmt.name}/{k}": t
                    for k, t in format_qparams(fmt, w, stats, "rtn").items()}
        if fmt.static_activations:
            qparams[f"{name}/act/scale"], qparams[f"{name}/act/zero"] = ACT
    return formats, qparams


def test_a_plan_of_every_format_matches_an_independent_reference(tmp_path):
    torch.manual_seed(0)
    model = build_tiny_model("llama").eval()
    formats, qparams = _plan(model)
    assert {type(f) for f in formats.values()} == set(specs())
    embeddings = {n for n, i in quantizable_layers(model).items() if i.kind == "embedding"}

    reference = copy.deepcopy(model)
    for name, fmt in formats.items():
        module = reference.get_submodule(name)
        qp = {k.rsplit("/", 1)[1]: t for k, t in qparams.items()
              if k.startswith(f"{name}/{fmt.name}/")}
        w_ref = _reference_weight(module.weight.detach().float(), fmt, qp)
        assert torch.allclose(quantized_weight(fmt, module.weight.detach(), qp), w_ref,
                              rtol=0, atol=1e-6), name
        module.weight.data = w_ref
        if fmt.static_activations:
            module.register_forward_pre_hook(_act_hook)

    builder = build_decoder(model, formats, qparams, np.float32)
    assert set(builder.fused) == {"model.layers.0.self_attn.qkv_proj",
                                  "model.layers.1.self_attn.qkv_proj"}
    graph = builder.model()
    assert graph_op_counts(graph, formats, builder.fused) == planned_op_counts(
        formats, embeddings, builder.fused)
    save_model(graph, tmp_path / "model.onnx")
    ids = np.random.default_rng(0).integers(1, 512, (2, 12))
    got, _ = OnnxDecoder(tmp_path / "model.onnx").run(ids)
    with torch.no_grad():
        want = reference(torch.from_numpy(ids)).logits.numpy()
        plain = model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert np.abs(got - plain).max() > 10 * np.abs(got - want).max()  # quantization is real
