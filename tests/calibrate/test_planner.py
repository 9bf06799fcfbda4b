"""The planner: exact against brute force, budgets respected, rules, impossible budgets."""

from __future__ import annotations

import itertools
import random

import pytest

from quantcal.calibrate.planner import Candidate, Rules, apply_rules, solve
from quantcal.calibrate.plans import make_plan, parse_size
from quantcal.config import Budget, CalibrateConfig, LayerInfo, RunRecord, SensitivityRecord
from quantcal.errors import QuantcalError
from quantcal.formats import FP16, W8A8, Int4, Int8, parse_format

FORMATS = [FP16(), Int8(), Int4(128), Int4(32)]


def _random_problem(rng: random.Random, layers: int = 6):
    cands = {}
    for i in range(layers):
        n, k = rng.choice([64, 128, 192]), rng.choice([64, 128, 256])
        cands[f"model.layers.{i}.proj"] = [
            Candidate(f, f.weight_bytes(n, k),
                      0.0 if isinstance(f, FP16) else rng.random() * (3 if f.bits == 4 else .3))
            for f in FORMATS]
    return cands


def _brute(cands, fits, cost):
    combos = [c for c in itertools.product(*cands.values()) if fits(c)]
    return min(cost(c) for c in combos)


@pytest.mark.parametrize("seed", range(12))
def test_size_budget_equals_brute_force(seed):
    rng = random.Random(seed)
    cands = _random_problem(rng)
    lo = sum(min(c.nbytes for c in cs) for cs in cands.values())
    hi = sum(max(c.nbytes for c in cs) for cs in cands.values())
    budget = rng.randint(lo, hi)
    chosen = solve(cands, max_bytes=budget)
    assert sum(c.nbytes for c in chosen.values()) <= budget  # exactly respected
    best = _brute(cands, lambda c: sum(x.nbytes for x in c) <= budget,
                  lambda c: sum(x.score for x in c))
    assert sum(c.score for c in chosen.values()) == pytest.approx(best, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_kl_budget_equals_brute_force(seed):
    rng = random.Random(100 + seed)
    cands = _random_problem(rng)
    limit = rng.uniform(0.0, 3.0)
    chosen = solve(cands, max_score=limit)
    assert sum(c.score for c in chosen.values()) <= limit + 1e-9
    best = _brute(cands, lambda c: sum(x.score for x in c) <= limit,
                  lambda c: sum(x.nbytes for x in c))
    assert sum(c.nbytes for c in chosen.values()) == best


def test_rules_pin_layers_and_conflicts_are_errors():
    cands = _random_problem(random.Random(0), layers=3)
    narrowed, why = apply_rules(cands, Rules.parse(("*.0.proj",), ("*.1.*=int8",)))
    assert [c.fmt for c in narrowed["model.layers.0.proj"]] == [FP16()]
    assert [c.fmt for c in narrowed["model.layers.1.proj"]] == [Int8()]
    assert why["model.layers.0.proj"].startswith("rule: --keep")
    assert why["model.layers.2.proj"] == "budget"
    with pytest.raises(QuantcalError, match="conflicting rules"):
        apply_rules(cands, Rules.parse(("*.0.proj",), ("*.0.*=int8",)))
    with pytest.raises(QuantcalError, match="matches no layer"):
        apply_rules(cands, Rules.parse(("lm_hed",)))
    with pytest.raises(QuantcalError, match="no int4-g64 qparams"):
        apply_rules(cands, Rules.parse((), ("*=int4-g64",)))
    with pytest.raises(QuantcalError, match="PATTERN=FORMAT"):
        Rules.parse((), ("int8",))


def test_optional_layers_enter_the_plan_only_when_forced():
    """An embedding (optional) is matched by rules like any layer but stays out of the plan
    (fp16) unless a rule pins it to a quantized format; w8a8 is a clear error for it."""
    cands = _random_problem(random.Random(2), layers=2)
    emb = "model.embed_tokens"
    cands[emb] = [Candidate(f, f.embedding_bytes(512, 64), 0.0) for f in FORMATS]
    narrowed, why = apply_rules(cands, Rules(), optional={emb})
    assert emb not in narrowed and emb not in why and len(narrowed) == 2
    narrowed, why = apply_rules(cands, Rules.parse(("*",)), optional={emb})  # kept: fp16
    assert emb not in narrowed and why["model.layers.0.proj"].startswith("rule: --keep")
    narrowed, why = apply_rules(cands, Rules.parse((), (f"{emb}=int4-g32",)), optional={emb})
    assert [c.fmt for c in narrowed[emb]] == [Int4(32)] and why[emb].startswith("rule: --force")
    with pytest.raises(QuantcalError, match="is an embedding, which takes fp16, int8 or int4"):
        apply_rules(cands, Rules.parse((), (f"{emb}=w8a8",)), optional={emb})
    with_w8a8 = {n: c + [Candidate(W8A8(), c[0].nbytes // 2, 0.0)] for n, c in cands.items()}
    narrowed, why = apply_rules(with_w8a8, Rules.parse((), ("*=w8a8",)), optional={emb})
    assert emb not in narrowed and len(narrowed) == 2  # a glob's w8a8 passes over it
    assert all(c[0].fmt == W8A8() for c in narrowed.values())
    with pytest.raises(QuantcalError, match="no int4-g64 qparams"):
        apply_rules(cands, Rules.parse((), (f"{emb}=int4-g64",)), optional={emb})
    with pytest.raises(QuantcalError, match="conflicting rules"):
        apply_rules(cands, Rules.parse(("*",), (f"{emb}=int8",)), optional={emb})


@pytest.mark.parametrize("text, value", [("90MB", 90_000_000), ("1.5GB", 1_500_000_000),
                                         ("500MiB", 500 * 2**20), ("1234", 1234)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_rejects_nonsense():
    with pytest.raises(QuantcalError, match="90MB"):
        parse_size("ninety")


def test_infeasible_solve_is_an_error():
    cands = _random_problem(random.Random(1), layers=2)
    with pytest.raises(QuantcalError):
        solve(cands, max_bytes=1)
    assert parse_format("int4-g32") in {c.fmt for c in cands["model.layers.0.proj"]}


VOCAB, HIDDEN, OTHER = 512, 64, 3000  # OTHER: norms and such, besides the fp16 table
TABLE = 2 * VOCAB * HIDDEN


def _record(tied: bool) -> RunRecord:
    formats = (Int8(), Int4(32), Int4(64))
    layers = {"model.embed_tokens": LayerInfo("embedding", HIDDEN, VOCAB),
              "model.layers.0.mlp.up_proj": LayerInfo("linear", HIDDEN, 128, 0),
              "lm_head": LayerInfo("linear", HIDDEN, VOCAB)}
    # tied or not, the fp16 table is outside the planned linear layers (as calibrate counts)
    return RunRecord(config=CalibrateConfig(model="m", formats=formats), layers=layers,
                     other_param_bytes=TABLE + OTHER, tied_lm_head=tied)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("emb, head, shared", [
    (None, "fp16", True),  # the head multiplies by the fp16 table
    ("int4-g32", "int4-g32", True),  # one packed table for both
    ("int4-g32", "fp16", False),  # the head needs its own fp16 weight
    ("int4-g32", "int8", False),
    ("int4-g64", "int4-g64", False),  # one asymmetric 4-bit block per row: padded, twice
])
def test_plan_size_counts_the_embedding_and_a_tied_head_once(tied, emb, head, shared):
    record = _record(tied)
    sens = SensitivityRecord("exact", record.config.formats, {
        n: {f.name: 0.1 for f in record.config.formats} for n in ("model.layers.0.mlp.up_proj",
                                                                 "lm_head")})
    force = (f"lm_head={head}",) + ((f"model.embed_tokens={emb}",) if emb else ())
    # a slack budget in KL: in bits, a tied head stored apart (fp16 beside an int4 table)
    # has no weights of its own and puts the plan above 16 bits/weight
    plan = make_plan(record, sens, Budget("max_kl", 1.0), Rules.parse((), force))
    up, head_bytes = (plan.layers[n].bytes for n in ("model.layers.0.mlp.up_proj", "lm_head"))
    assert head_bytes == parse_format(head).weight_bytes(VOCAB, HIDDEN)
    table = TABLE
    if emb:
        entry = plan.layers["model.embed_tokens"]
        assert entry.score is None and entry.reason.startswith("rule: --force")
        table = entry.bytes
        assert table == parse_format(emb).embedding_bytes(VOCAB, HIDDEN)
    else:
        assert "model.embed_tokens" not in plan.layers
    stored_head = 0 if tied and shared else head_bytes
    assert plan.predicted_size_bytes == up + table + stored_head + OTHER
    # the same count holds when the plan is solved for a size
    sized = make_plan(record, sens, Budget("max_size", float(plan.predicted_size_bytes)),
                      Rules.parse((), force))
    assert sized.predicted_size_bytes <= plan.predicted_size_bytes


def _tied_qwen2_record():
    from quantcal.calibrate.api import _outside_bytes
    from quantcal.models import quantizable_layers
    from tinymodels import build_tiny_model

    model = build_tiny_model("qwen2")  # its config ties the embeddings
    layers = quantizable_layers(model)
    record = RunRecord(config=CalibrateConfig(model="m", formats=(Int8(), Int4(32))),
                       layers=layers, **_outside_bytes(model, layers))
    assert record.tied_lm_head
    sens = SensitivityRecord("exact", record.config.formats, {
        n: {"int8": 0.01, "int4-g32": 0.1} for n, i in layers.items() if i.kind != "embedding"})
    return record, sens


@pytest.mark.parametrize("budget", [Budget("target_bits", 4.7), Budget("max_size", None),
                                    Budget("max_kl", 0.5)], ids=lambda b: b.kind)
def test_tied_fp16_head_is_free_under_every_budget(budget):
    """A tied fp16 lm_head is the embedding table: it costs 0 bits and 0 bytes, so no
    budget quantizes it to "save" room (that would store the table and an int4 head)."""
    record, sens = _tied_qwen2_record()
    if budget.kind == "max_size":  # all int4 but the head, which is free
        body = sum(Int4(32).weight_bytes(i.out_features, i.in_features)
                   for n, i in record.layers.items() if i.kind == "linear" and n != "lm_head")
        budget = Budget("max_size", float(body + record.other_param_bytes))
    plan = make_plan(record, sens, budget, Rules())
    assert plan.layers["lm_head"].format == FP16()
    body = {n: p for n, p in plan.layers.items() if n != "lm_head"}
    weights = sum(record.layers[n].in_features * record.layers[n].out_features
                  for n in body)
    assert plan.totals["bits_per_weight"] == pytest.approx(
        8 * sum(p.bytes for p in body.values()) / weights)  # the head: no bytes, no weights
    assert plan.predicted_size_bytes == (sum(p.bytes for p in body.values())
                                         + record.other_param_bytes)
    if budget.kind == "target_bits":
        assert plan.totals["bits_per_weight"] <= 4.7  # all-int4-g32 is 4.625
