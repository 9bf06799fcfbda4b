"""The planner: exact against brute force, budgets respected, rules, impossible budgets."""

from __future__ import annotations

import itertools
import random

import pytest

from quantcal.calibrate.planner import Candidate, Rules, apply_rules, solve
from quantcal.calibrate.plans import parse_size
from quantcal.errors import QuantcalError
from quantcal.formats import FP16, Int4, Int8, parse_format

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
