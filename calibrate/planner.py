"""The mixed-precision planner: one format per layer, least predicted damage, within budget.

A multiple-choice knapsack solved exactly as a 0/1 integer program (HiGHS through
``scipy.optimize.milp``, zero optimality gap): binary ``x[l, j]`` picks candidate ``j`` of
layer ``l``; each layer picks exactly one. Budgets:

- ``target_bits`` B: total stored bits (scales and zero points counted) <= B x weights;
- ``max_size`` S: predicted exported model size <= S (everything outside the plan counted);
- ``max_kl`` X: minimise size subject to total predicted KL <= X.

Speed: each candidate carries its latency per decode step (us) and :class:`FuseGroup` says
which layers (q, k, v; gate, up) the export computes as one node when they share a format.
Binary ``y[g, f]``, linked to be exactly "every layer of group g picked f", makes the fused
latency linear, so ``max_latency`` (``--min-tok-s``) is one more constraint of the same
program, and ``prefer_fused`` (``--prefer-fusable TOL``) a second stage: the most fused groups
among plans within TOL of the optimum (see :func:`solve`).

Rules narrow a layer's candidates first: ``keep`` globs pin fp16, ``force`` globs pin a format.
Optional layers (the token embedding: no sensitivity score to plan it by) enter the plan only
when a rule pins them to a quantized format. Pure functions of the candidates; reading and
writing files is the caller's job.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Collection, Sequence

import numpy as np

from quantcal.errors import QuantcalError
from quantcal.formats import FP16, BlockQuant, Format, parse_format


@dataclass(frozen=True)
class Candidate:
    fmt: Format
    nbytes: int
    score: float
    latency: float = 0.0  # microseconds per decode step of this layer alone in fmt


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


@dataclass(frozen=True)
class FuseGroup:
    """Layers that read one input (q, k, v or gate, up of a block): the export computes them
    as one node when they share a format. ``fused[fmt]``: that node's latency (us); formats
    it lacks are not fused."""

    layers: tuple[str, ...]
    fused: dict[Format, float]


def _shared(chosen: dict[str, Candidate], group: FuseGroup) -> Format | None:
    """The format every layer of ``group`` has in ``chosen``, if the group fuses in it."""
    fmts = {chosen[n].fmt for n in group.layers if n in chosen}
    if len(fmts) != 1 or any(n not in chosen for n in group.layers):
        return None
    fmt = fmts.pop()
    return fmt if fmt in group.fused else None


def latency_of(chosen: dict[str, Candidate], groups: Sequence[FuseGroup] = ()) -> float:
    """Microseconds of the chosen layers: each alone, but a group sharing a format as its
    one fused node."""
    total = sum(c.latency for c in chosen.values())
    for group in groups:
        fmt = _shared(chosen, group)
        if fmt is not None:
            total += group.fused[fmt] - sum(chosen[n].latency for n in group.layers)
    return total


def fused_count(chosen: dict[str, Candidate], groups: Sequence[FuseGroup]) -> int:
    """How many groups share a format (one node each in the export)."""
    return sum(_shared(chosen, g) is not None for g in groups)


class _Program:
    """The 0/1 program: ``x`` picks one candidate per layer; with groups, ``y[g, f]`` is 1
    exactly when every layer of group ``g`` picks ``f`` (``y <= x_l`` for each member and
    ``y >= sum x_l - (members - 1)``), so the fused latency and the count of fused groups
    are linear in ``(x, y)``."""

    def __init__(self, candidates: dict[str, list[Candidate]], groups: Sequence[FuseGroup]):
        self.names = list(candidates)
        self.flat = [c for n in self.names for c in candidates[n]]
        self.ranges, start, col = {}, 0, {}
        for n in self.names:
            self.ranges[n] = range(start, start + len(candidates[n]))
            for i in self.ranges[n]:
                col[n, self.flat[i].fmt] = i
            start += len(candidates[n])
        self.links = []  # (members' x columns, latency of the fused node minus theirs)
        for g in groups:
            for fmt, us in g.fused.items():
                cols = [col.get((n, fmt)) for n in g.layers]
                if None not in cols:
                    self.links.append((cols, us - sum(self.flat[i].latency for i in cols)))
        self.size = len(self.flat) + len(self.links)

    def column(self, what: str) -> np.ndarray:
        """bytes, score, latency or fused (1 per fused group) of each variable."""
        none = [0.0] * len(self.flat)
        x = {"bytes": [c.nbytes for c in self.flat], "score": [c.score for c in self.flat],
             "latency": [c.latency for c in self.flat]}.get(what, none)
        y = {"latency": [d for _, d in self.links],
             "fused": [1.0] * len(self.links)}.get(what, [0.0] * len(self.links))
        return np.array(list(x) + list(y), dtype=np.float64)

    def solve(self, cost: np.ndarray, limits: dict[str, float]) -> np.ndarray | None:
        """min cost.(x, y) within ``limits`` (upper bounds of columns); x as a bool array,
        None if infeasible."""
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import coo_matrix

        rows, cols, vals, lo, hi = [], [], [], [], []

        def row(entries, low, high):
            for c, v in entries:
                rows.append(len(lo)), cols.append(c), vals.append(v)
            lo.append(low), hi.append(high)

        for n in self.names:
            row([(i, 1.0) for i in self.ranges[n]], 1.0, 1.0)
        for k, (members, _) in enumerate(self.links):
            y = len(self.flat) + k
            for i in members:
                row([(y, 1.0), (i, -1.0)], -np.inf, 0.0)
            row([(i, 1.0) for i in members] + [(y, -1.0)], -np.inf, len(members) - 1.0)
        constraints = [LinearConstraint(coo_matrix((vals, (rows, cols)),
                                                   shape=(len(lo), self.size)), lo, hi)]
        for what, limit in limits.items():
            weight = self.column(what)
            scale = max(float(np.abs(weight).max()), 1e-30)
            constraints.append(LinearConstraint((weight / scale)[None, :], -np.inf,
                                                limit / scale))
        cscale = max(float(np.abs(cost).max()), 1e-30)
        res = milp(cost / cscale, constraints=constraints, integrality=np.ones(self.size),
                   bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0, "presolve": True})
        if res.x is None:
            return None
        return np.round(res.x[:len(self.flat)]).astype(bool)

    def chosen(self, x: np.ndarray) -> dict[str, Candidate]:
        return {n: self.flat[next(i for i in self.ranges[n] if x[i])] for n in self.names}


def _within(program: _Program, cost: np.ndarray, limits: dict[str, float],
            groups: Sequence[FuseGroup]) -> dict[str, Candidate] | None:
    """The optimum of ``cost`` within ``limits``, checked exactly: the solver's feasibility
    tolerance is relative, so a limit it overshoots is tightened and the program solved
    again (bytes are whole numbers; latency is held to 1e-9 of its limit)."""
    limits = dict(limits)
    for _ in range(4):
        x = program.solve(cost, limits)
        if x is None:
            return None
        chosen = program.chosen(x)
        over = {}
        if "bytes" in limits and sum(c.nbytes for c in chosen.values()) > limits["bytes"]:
            over["bytes"] = limits["bytes"] - max(1.0, 1e-9 * limits["bytes"])
        if "latency" in limits and (latency_of(chosen, groups)
                                    > limits["latency"] * (1 + 1e-9)):
            over["latency"] = limits["latency"] * (1 - 1e-9)
        if not over:
            return chosen
        limits.update(over)
    return None


def solve(candidates: dict[str, list[Candidate]], *, max_bytes: int | None = None,
          max_score: float | None = None, max_latency: float | None = None,
          groups: Sequence[FuseGroup] = (), prefer_fused: float | None = None
          ) -> dict[str, Candidate]:
    """The exact optimum: least total score within ``max_bytes``, or least bytes within
    ``max_score`` (ties broken towards the lower score), in both cases within
    ``max_latency`` microseconds (:func:`latency_of`) when given.

    ``prefer_fused`` (TOL, in score units) adds a second stage: among the plans within the
    same limits whose score is at most the optimum's plus TOL (and, under ``max_score``,
    whose bytes do not exceed the optimum's), the one with the most groups sharing a format
    (:func:`fused_count`), ties broken by the first stage's objective. Raises if infeasible.
    """
    with_groups = groups if (max_latency is not None or prefer_fused is not None) else ()
    program = _Program(candidates, with_groups)
    nbytes, score = program.column("bytes"), program.column("score")
    limits = {k: float(v) for k, v in (("bytes", max_bytes), ("score", max_score),
                                       ("latency", max_latency)) if v is not None}
    if max_bytes is not None:
        cost = score
    else:
        least = float(nbytes[:len(program.flat)].min())
        cost = nbytes + score / max(float(score.sum()), 1e-30) * 1e-6 * least
    chosen = _within(program, cost, limits, with_groups)
    if chosen is None:
        raise QuantcalError("no assignment of formats meets the budget; loosen it (a larger "
                            "--target-bits, --max-size, --max-kl or a lower --min-tok-s) or "
                            "drop a --keep/--force rule")
    if prefer_fused is None or not program.links:
        return chosen
    second = dict(limits)
    if max_bytes is None:  # the size is what this budget minimises: it may not grow, and
        # the optimum's score is the least at that size (exactly, not the tie-break's)
        second["bytes"] = float(sum(c.nbytes for c in chosen.values()))
        chosen = _within(program, score, second, with_groups) or chosen
    best = sum(c.score for c in chosen.values())
    second["score"] = min(limits.get("score", np.inf), best + prefer_fused)
    # one fused group outweighs any tie-break: the tie term of a plan stays below 1/2
    worst = sum(max(cost[i] for i in program.ranges[n]) for n in program.names)
    tie = cost / max(2.0 * float(worst), 1e-30)
    return _within(program, tie - program.column("fused"), second, with_groups) or chosen


def least_latency(candidates: dict[str, list[Candidate]], groups: Sequence[FuseGroup] = (),
                  *, max_bytes: int | None = None, max_score: float | None = None) -> float:
    """The lowest :func:`latency_of` any assignment within the budget reaches."""
    program = _Program(candidates, groups)
    limits = {k: float(v) for k, v in (("bytes", max_bytes), ("score", max_score))
              if v is not None}
    chosen = _within(program, program.column("latency"), limits, groups)
    if chosen is None:
        raise QuantcalError("no assignment of formats meets the budget; loosen it or drop a "
                            "--keep/--force rule")
    return latency_of(chosen, groups)


def feasible_bytes(candidates: dict[str, list[Candidate]]) -> tuple[int, int]:
    """Smallest and largest total bytes any assignment can take."""
    return (sum(min(c.nbytes for c in cs) for cs in candidates.values()),
            sum(max(c.nbytes for c in cs) for cs in candidates.values()))
