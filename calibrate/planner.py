"""The mixed-precision planner: one format per layer, least predicted damage, within budget.

A multiple-choice knapsack solved exactly as a 0/1 integer program (HiGHS through
``scipy.optimize.milp``, zero optimality gap): binary ``x[l, j]`` picks candidate ``j`` of
layer ``l``; each layer picks exactly one. Budgets:

- ``target_bits`` B: total stored bits (scales and zero points counted) <= B x weights;
- ``max_size`` S: predicted exported model size <= S (everything outside the plan counted);
- ``max_kl`` X: minimise size subject to total predicted KL <= X.

Rules narrow a layer's candidates first: ``keep`` globs pin fp16, ``force`` globs pin a format.
Optional layers (the token embedding: no sensitivity score to plan it by) enter the plan only
when a rule pins them to a quantized format. Pure functions of the candidates; reading and
writing files is the caller's job.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Collection

import numpy as np

from quantcal.errors import QuantcalError
from quantcal.formats import FP16, BlockQuant, Format, parse_format


@dataclass(frozen=True)
class Candidate:
    fmt: Format
    nbytes: int
    score: float


@dataclass(frozen=True)
class Rules:
    keep: tuple[str, ...] = ()
    force: tuple[tuple[str, Format], ...] = ()

    @classmethod
    def parse(cls, keep: tuple[str, ...] = (), force: tuple[str, ...] = ()) -> "Rules":
        pairs = []
        for item in force:
            pattern, sep, fmt = item.rpartition("=")
            if not sep or not pattern:
                raise QuantcalError(f"--force {item!r}: write PATTERN=FORMAT, e.g. "
                                    "'*.down_proj=int8'")
            pairs.append((pattern, parse_format(fmt)))
        return cls(tuple(keep), tuple(pairs))


def apply_rules(candidates: dict[str, list[Candidate]], rules: Rules,
                optional: Collection[str] = ()
                ) -> tuple[dict[str, list[Candidate]], dict[str, str]]:
    """Narrow each layer's candidates by the rules; returns them and each layer's reason.

    Layers in ``optional`` (embeddings) are matched like any other, but left out of the
    result (they stay fp16) unless a rule pins them to a quantized format. A glob asking
    for a format an embedding cannot take (w8a8) passes over it; naming it is an error.
    """
    pinned: dict[str, tuple[Format, str]] = {}
    for pattern, fmt, why in ([(p, FP16(), f"--keep {p}") for p in rules.keep]
                              + [(p, f, f"--force {p}={f.name}") for p, f in rules.force]):
        hits = [n for n in candidates if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise QuantcalError(f"{why} matches no layer; layer names look like "
                                f"{next(iter(candidates))!r}")
        for name in hits:
            if name in optional and name != pattern and not isinstance(fmt, (BlockQuant, FP16)):
                continue  # a glob's w8a8 passes over the embedding, which cannot take it
            if name in pinned and pinned[name][0] != fmt:
                raise QuantcalError(f"conflicting rules for {name}: {pinned[name][1]} and {why}")
            pinned[name] = (fmt, why)
    out, reasons = {}, {}
    for name, cands in candidates.items():
        if name not in pinned:
            if name not in optional:
                out[name], reasons[name] = cands, "budget"
            continue
        fmt, why = pinned[name]
        match = [c for c in cands if c.fmt == fmt]
        if not match and name in optional and not isinstance(fmt, BlockQuant):
            raise QuantcalError(f"{why}: {name} is an embedding, which takes fp16, int8 or "
                                f"int4-gN, not {fmt.name}; narrow the pattern")
        if not match:
            have = ", ".join(c.fmt.name for c in cands)
            raise QuantcalError(f"{why}: {name} has no {fmt.name} qparams (it has {have}); "
                                f"re-run `quantcal calibrate` with {fmt.name} among --formats")
        if name not in optional or not isinstance(fmt, FP16):
            out[name], reasons[name] = match, f"rule: {why}"
    return out, reasons


def _milp(cost: np.ndarray, weight: np.ndarray, groups: list[range], limit: float
          ) -> np.ndarray | None:
    """min cost.x  s.t.  weight.x <= limit, one x per group, x binary. None if infeasible."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    n = cost.size
    onehot = np.zeros((len(groups), n))
    for g, idx in enumerate(groups):
        onehot[g, list(idx)] = 1.0
    scale = max(float(np.abs(weight).max()), 1e-30)
    constraints = [LinearConstraint(onehot, 1.0, 1.0),
                   LinearConstraint((weight / scale)[None, :], -np.inf, limit / scale)]
    cscale = max(float(np.abs(cost).max()), 1e-30)
    res = milp(cost / cscale, constraints=constraints, integrality=np.ones(n),
               bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0, "presolve": True})
    if res.x is None:
        return None
    return np.round(res.x).astype(bool)


def solve(candidates: dict[str, list[Candidate]], *, max_bytes: int | None = None,
          max_score: float | None = None) -> dict[str, Candidate]:
    """The exact optimum: least total score within ``max_bytes``, or least bytes within
    ``max_score`` (ties broken towards the lower score). Raises if infeasible."""
    names = list(candidates)
    flat = [c for n in names for c in candidates[n]]
    groups, start = [], 0
    for n in names:
        groups.append(range(start, start + len(candidates[n])))
        start += len(candidates[n])
    nbytes = np.array([c.nbytes for c in flat], dtype=np.float64)
    score = np.array([c.score for c in flat], dtype=np.float64)
    if max_bytes is not None:
        limit = float(max_bytes)
        for _ in range(3):  # the solver's feasibility tolerance is relative: verify exactly
            x = _milp(score, nbytes, groups, limit)
            if x is None or int(sum(c.nbytes for c, on in zip(flat, x) if on)) <= max_bytes:
                break
            limit -= max(1.0, 1e-9 * limit)
    else:
        tie = score / max(float(score.sum()), 1e-30) * 1e-6 * float(nbytes.min())
        x = _milp(nbytes + tie, score, groups, float(max_score))
    if x is None:
        raise QuantcalError("no assignment of formats meets the budget; loosen it (a larger "
                            "--target-bits, --max-size or --max-kl) or drop a --keep/--force "
                            "rule")
    return {n: flat[next(i for i in groups[k] if x[i])] for k, n in enumerate(names)}


def feasible_bytes(candidates: dict[str, list[Candidate]]) -> tuple[int, int]:
    """Smallest and largest total bytes any assignment can take."""
    return (sum(min(c.nbytes for c in cs) for cs in candidates.values()),
            sum(max(c.nbytes for c in cs) for cs in candidates.values()))
