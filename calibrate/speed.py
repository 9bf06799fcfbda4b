"""A plan's decode speed at batch 1, predicted from a kernel latency table.

One decode step at batch 1 is predicted as the planned projections, each one node of
onnxruntime (its latency from the table: measured, or the table's bandwidth model), except
that q/k/v of a block that share a format are one fused node, as the export emits them by
default (fp16, int8 or int4, never w8a8; gate/up too where the export fuses them,
``DEFAULT_KINDS`` of :mod:`quantcal.export.fusion`); plus ``blocks x block_overhead_us +
token_overhead_us`` from the table for everything else (attention and its KV cache, norms,
activations, residual adds, the embedding gather, the greedy argmax). The embedding's format
changes nothing here. Tokens/s = 1e6 / step microseconds.

:func:`speed_problem` turns the table and the user's ``--min-tok-s`` / ``--prefer-fusable``
into what the planner's integer program takes (candidate latencies, fusable groups, a
latency limit); :func:`predict` describes a chosen plan. Reads a run record's layer shapes
and a table; writes nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Mapping

from quantcal.calibrate.planner import Candidate, FuseGroup, least_latency
from quantcal.config import PlanSpeed, RunRecord
from quantcal.errors import QuantcalError
from quantcal.export.fusion import DEFAULT_KINDS, GATE_UP
from quantcal.families import FAMILIES, Graph
from quantcal.formats import FP16, Format
from quantcal.latency import LatencyTable, default_table, fusable, load_table


@dataclass(frozen=True)
class SpeedOptions:
    """The table to predict with (``name``: where it came from) and the user's speed goals:
    ``min_tok_s`` (a constraint) and ``prefer_fusable`` (TOL, nats/token of KL to give up
    at most for more fused groups)."""

    table: LatencyTable
    name: str = "shipped with quantcal"
    min_tok_s: float | None = None
    prefer_fusable: float | None = None

    @classmethod
    def default(cls) -> "SpeedOptions":
        return cls(default_table())

    def describe(self) -> str:
        return f"{self.table.describe()}, {self.name}"


def speed_options(table: str | os.PathLike | None = None, min_tok_s: float | None = None,
                  prefer_fusable: float | None = None) -> SpeedOptions:
    """The options ``quantcal plan`` was given: a table file (None: the shipped one)."""
    if table is None:
        return SpeedOptions(default_table(), min_tok_s=min_tok_s, prefer_fusable=prefer_fusable)
    return SpeedOptions(load_table(table), str(table), min_tok_s, prefer_fusable)


def fuse_groups(record: RunRecord) -> list[tuple[str, ...]]:
    """The layers of each block that read one input (q, k, v; gate, up), by the rotary
    families' module names; a family whose checkpoint fuses them has none."""
    linear = {n for n, i in record.layers.items() if i.kind != "embedding"}
    blocks = sorted({i.block for i in record.layers.values() if i.block is not None})
    out = []
    for fam in FAMILIES:
        if fam.graph is not Graph.ROTARY:
            continue
        att, mlp = fam.attention, fam.mlp
        for b in blocks:
            groups = [] if att.qkv else [tuple(fam.attn(b, p) for p in (att.q, att.k, att.v))]
            if fam.gated_mlp and mlp.gate_up is None and GATE_UP in DEFAULT_KINDS:
                groups.append((fam.mlp_part(b, mlp.gate), fam.mlp_part(b, mlp.up)))
            out += [g for g in groups if set(g) <= linear and g not in out]
    return out


def _parts(record: RunRecord, names) -> tuple[tuple[int, ...], int]:
    """Output widths of ``names`` and their shared input width."""
    infos = [record.layers[n] for n in names]
    return tuple(i.out_features for i in infos), infos[0].in_features


def blocks_of(record: RunRecord) -> int:
    return len({i.block for i in record.layers.values() if i.block is not None})


def overhead_us(record: RunRecord, table: LatencyTable) -> float:
    """Microseconds of a decode step beside the planned projections."""
    return blocks_of(record) * table.block_overhead_us + table.token_overhead_us


@dataclass(frozen=True)
class SpeedProblem:
    """The speed side of one plan's integer program (see :func:`speed_problem`)."""

    groups: tuple[FuseGroup, ...]
    overhead_us: float
    options: SpeedOptions

    def solver_kwargs(self) -> dict:
        opts = self.options
        limit = None if opts.min_tok_s is None else 1e6 / opts.min_tok_s - self.overhead_us
        return {"groups": self.groups, "max_latency": limit,
                "prefer_fused": opts.prefer_fusable}

    def unreachable(self, costed: dict[str, list[Candidate]], limit: dict) -> QuantcalError:
        """The error for a ``--min-tok-s`` no plan within the budget meets: the fastest
        plan's prediction (or the budget's own error when nothing meets that either)."""
        try:
            fastest = 1e6 / (least_latency(costed, self.groups, **limit) + self.overhead_us)
        except QuantcalError as exc:
            return exc
        return QuantcalError(
            f"--min-tok-s {self.options.min_tok_s:g} cannot be met within this budget: the "
            f"fastest plan predicts {fastest:.1f} tok/s (table: {self.options.describe()}); "
            f"pass --min-tok-s {int(fastest * 10) / 10:g} or less, or loosen the budget")


def speed_problem(record: RunRecord, cands: dict[str, list[Candidate]],
                  options: SpeedOptions) -> tuple[dict[str, list[Candidate]], SpeedProblem]:
    """``cands`` with each candidate's latency (embeddings: 0) and the fusable groups with
    their fused nodes' latencies, for :func:`~quantcal.calibrate.planner.solve`."""
    table = options.table
    timed = {}
    for name, cs in cands.items():
        info = record.layers[name]
        timed[name] = [c if info.kind == "embedding" else replace(
            c, latency=table.node_us(c.fmt, (info.out_features,), info.in_features,
                                     fused=False)[0]) for c in cs]
    groups = []
    for members in fuse_groups(record):
        if not set(members) <= set(cands):
            continue
        parts, k = _parts(record, members)
        shared = set.intersection(*({c.fmt for c in cands[n]} for n in members))
        groups.append(FuseGroup(members, {f: table.node_us(f, parts, k, fused=True)[0]
                                          for f in shared if fusable(f)}))
    overhead = overhead_us(record, table)
    if options.min_tok_s is not None and 1e6 / options.min_tok_s <= overhead:
        raise QuantcalError(
            f"--min-tok-s {options.min_tok_s:g} cannot be met: the {blocks_of(record)} "
            f"blocks' overhead alone ({overhead:.0f} us per step, table: "
            f"{options.describe()}) allows {1e6 / overhead:.1f} tok/s at most")
    return timed, SpeedProblem(tuple(groups), overhead, options)


def predict(record: RunRecord, formats: Mapping[str, Format], options: SpeedOptions,
            groups: list[tuple[str, ...]] | None = None
            ) -> tuple[float, dict[str, float], PlanSpeed]:
    """Predicted decode tokens/s at batch 1 of a plan (``formats``; a quantizable layer it
    omits is fp16), each layer's share of the step (us; a fused node split in proportion
    to its layers' latencies apart) and how the prediction was made. ``groups``: the
    layers the export may fuse (default :func:`fuse_groups`; [] for an export that fuses
    nothing)."""
    table = options.table
    fmt = {n: formats.get(n, FP16()) for n, i in record.layers.items()
           if i.kind != "embedding"}
    alone = {n: table.node_us(f, (record.layers[n].out_features,),
                              record.layers[n].in_features, fused=False) for n, f in fmt.items()}
    share = {n: us for n, (us, _) in alone.items()}
    measured = {n: m for n, (_, m) in alone.items()}
    nodes = {(n,) for n in fmt}  # each node as the layers it computes
    groups = fuse_groups(record) if groups is None else groups
    fused = 0
    for members in groups:
        f = fmt[members[0]]
        if not fusable(f) or any(fmt[n] != f for n in members):
            continue
        parts, k = _parts(record, members)
        us, was_measured = table.node_us(f, parts, k, fused=True)
        apart = sum(share[n] for n in members)
        for n in members:
            share[n] = us * share[n] / apart
            nodes.discard((n,))
        measured[members[0]] = was_measured
        nodes.add(members)
        fused += 1
    layers_us = sum(share.values())
    over = overhead_us(record, table)
    counted = sum(measured[key[0]] for key in nodes)
    speed = PlanSpeed(step_us=layers_us + over, layers_us=layers_us, overhead_us=over,
                      blocks=blocks_of(record), fused_groups=fused, groups=len(groups),
                      measured_nodes=counted, modelled_nodes=len(nodes) - counted,
                      table=options.describe(), min_tok_s=options.min_tok_s,
                      prefer_fusable=options.prefer_fusable)
    return 1e6 / speed.step_us, share, speed
