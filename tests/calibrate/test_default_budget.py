"""The default plan on SmolLM2-135M's shapes (hidden 576, MLP 1536, 30 blocks, tied head)
has a choice to make: with calibrate's default formats, 4.5 bits/weight lies inside the
feasible range. Before int4-g64 joined the defaults, the cheapest plan of int8, int4-g128
and int4-g32 stored 4.508 bits/weight (the tied head free), so the default budget was moved
there and every layer took its cheapest format."""

from __future__ import annotations

import logging
import math

import pytest

from quantcal.calibrate.planner import Rules
from quantcal.calibrate.plans import DEFAULT_BITS, make_plan
from quantcal.cli import cli
from quantcal.config import CalibrateConfig, LayerInfo, RunRecord, SensitivityRecord
from quantcal.formats import Int4, parse_formats

HIDDEN, MLP, KV, VOCAB, BLOCKS = 576, 1536, 192, 49152, 30


def _smollm2(formats) -> tuple[RunRecord, SensitivityRecord]:
    shapes = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, KV),
              "self_attn.v_proj": (HIDDEN, KV), "self_attn.o_proj": (HIDDEN, HIDDEN),
              "mlp.gate_proj": (HIDDEN, MLP), "mlp.up_proj": (HIDDEN, MLP),
              "mlp.down_proj": (MLP, HIDDEN)}
    layers = {"model.embed_tokens": LayerInfo("embedding", HIDDEN, VOCAB)}
    for b in range(BLOCKS):
        layers.update({f"model.layers.{b}.{n}": LayerInfo("linear", k, out, b)
                       for n, (k, out) in shapes.items()})
    layers["lm_head"] = LayerInfo("linear", HIDDEN, VOCAB)
    record = RunRecord(config=CalibrateConfig(model="smollm2", formats=formats), layers=layers,
                       other_param_bytes=2 * VOCAB * HIDDEN, tied_lm_head=True)
    # coarser groups hurt more, as they do: the plan has a reason to mix
    score = {"int8": 0.001, "int4-g32": 0.01, "int4-g64": 0.02, "int4-g128": 0.04}
    sens = SensitivityRecord("exact", formats, {
        n: {f.name: score[f.name] for f in formats} for n, i in layers.items()
        if i.kind != "embedding"})
    return record, sens


def _default_formats():
    (param,) = [p for p in cli.commands["calibrate"].params if p.name == "formats"]
    return parse_formats(param.default)


def test_int4_g64_on_576_wide_rows_is_under_the_default_budget():
    # 9 groups of 64 per row: 4-bit codes + fp16 scale + 4-bit zero point per group, the
    # zero points of a row packed into whole bytes (9 x 4 bits -> 5 bytes)
    bits = 8 * Int4(64).weight_bytes(HIDDEN, HIDDEN) / (HIDDEN * HIDDEN)
    assert bits == pytest.approx((HIDDEN * 4 + 9 * 16 + 5 * 8) / HIDDEN)
    assert bits < DEFAULT_BITS


def test_default_plan_keeps_the_default_budget_and_mixes_formats(caplog):
    record, sens = _smollm2(_default_formats())
    with caplog.at_level(logging.WARNING, logger="quantcal"):
        plan = make_plan(record, sens, None, Rules())
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert (plan.budget.kind, plan.budget.value) == ("target_bits", DEFAULT_BITS)
    assert plan.totals["bits_per_weight"] <= DEFAULT_BITS
    used = {p.format.name for n, p in plan.layers.items() if n != "lm_head"}
    assert len(used) >= 2, used  # a choice, not every layer at its cheapest


def test_without_int4_g64_the_default_moves_up_and_says_why(caplog):
    # the cheapest of int8, int4-g128, int4-g32 per row: 576-wide rows pad int4-g128 to 640
    # (5 groups: 4.625 bits, as int4-g32), 1536-wide down_proj rows take int4-g128 exactly
    # (4 + 20 / 128 = 4.15625); the tied head is stored with the fp16 table: no bits
    wide = HIDDEN * (2 * HIDDEN + 2 * KV + 2 * MLP)  # q, o, k, v, gate, up per block
    least = (4.625 * wide + 4.15625 * MLP * HIDDEN) / (wide + MLP * HIDDEN)
    record, sens = _smollm2(parse_formats("int8,int4-g128,int4-g32"))
    with caplog.at_level(logging.WARNING, logger="quantcal"):
        plan = make_plan(record, sens, None, Rules())
    assert least > DEFAULT_BITS
    assert plan.budget.value == pytest.approx(math.ceil(least * 1000) / 1000)
    (notice,) = [r.getMessage() for r in caplog.records]
    assert "default 4.5 bits/weight is below" in notice and "add int4-g64" in notice
