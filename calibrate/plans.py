"""From sensitivities and a budget to ``plan.json``, and the whole plan's measured KL.

Builds each layer's candidates (fp16 plus every calibrated format, with the bytes the export
will store and the sensitivity score), turns the user's budget into the planner's limit
(with the feasible range in the error when it cannot be met), solves, and writes a
:class:`~quantcal.config.Plan` that says per layer its format, bits, bytes, score and why.

The token embedding has no score: it stays fp16, outside the plan, unless ``--force`` names
it. Sizes follow the export: a planned embedding's bytes leave ``other_param_bytes`` (its
fp16 table) for its format's, and a tied head is counted once with the embedding when
``shares_tied_weight`` says the export stores them once: under every budget (bits, size,
KL) such a head costs 0 bits, so quantizing it never "saves" room. The plan predicts the
size of both exports: fp16 (``--provider cuda``) and fp32 (``--provider cpu``, whose
unquantized weights, norms and scales take twice the bytes), and its decode tokens/s at
batch 1 from a kernel latency table (:mod:`quantcal.calibrate.speed`), which
``--min-tok-s`` bounds and ``--prefer-fusable`` trades KL for.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import replace
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from quantcal.calibrate.planner import Candidate, Rules, apply_rules, feasible_bytes, solve
from quantcal.calibrate.speed import SpeedOptions, SpeedProblem, predict, speed_problem
from quantcal.config import Budget, LayerPlan, Plan, RunRecord, SensitivityRecord
from quantcal.errors import QuantcalError
from quantcal.fakequant import fake_quant_modules, swapped
from quantcal.formats import FP16, Format, Int4, shares_tied_weight

log = logging.getLogger(__name__)

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_size(text: str) -> int:
    """``"90MB"``, ``"1.2GB"``, ``"500MiB"`` or plain bytes -> bytes."""
    m = _SIZE.match(str(text))
    unit = (m.group(2) or "").lower() if m else None
    if m is None or unit not in _UNITS:
        raise QuantcalError(f"--max-size {text!r}: write a size such as 90MB, 1.2GB or 500MiB")
    return int(float(m.group(1)) * _UNITS[unit])


DEFAULT_BITS = 4.5


def budget_from_options(target_bits: float | None, max_size: str | None,
                        max_kl: float | None) -> Budget | None:
    """The budget the user asked for; None when none was given (see :func:`make_plan`)."""
    given = [(k, v) for k, v in (("target_bits", target_bits), ("max_size", max_size),
                                 ("max_kl", max_kl)) if v is not None]
    if len(given) > 1:
        raise QuantcalError("give one budget: --target-bits, --max-size or --max-kl, not "
                            + " and ".join(f"--{k.replace('_', '-')}" for k, _ in given))
    if not given:
        return None
    kind, value = given[0]
    return Budget(kind, float(parse_size(value)) if kind == "max_size" else float(value))


def candidates(record: RunRecord, sens: SensitivityRecord) -> dict[str, list[Candidate]]:
    """fp16 plus each scored format, per quantizable layer, in model order."""
    out = {}
    for name, info in record.layers.items():
        if info.kind == "embedding" or name not in sens.scores:
            continue
        n, k = info.out_features, info.in_features
        out[name] = [Candidate(FP16(), FP16().weight_bytes(n, k), 0.0)] + [
            Candidate(f, f.weight_bytes(n, k), max(sens.scores[name][f.name], 0.0))
            for f in sens.formats if not isinstance(f, FP16)]
    return out


def embedding_candidates(record: RunRecord, formats: tuple[Format, ...]
                         ) -> dict[str, list[Candidate]]:
    """fp16 plus each calibrated block format for the token embedding, with no score (planned
    only when a rule pins it, see ``apply_rules``)."""
    out = {}
    for name, info in record.layers.items():
        if info.kind == "embedding":
            fmts = [FP16()] + [f for f in formats if f.embeddable and not isinstance(f, FP16)]
            out[name] = [Candidate(f, f.embedding_bytes(info.out_features, info.in_features),
                                   0.0) for f in fmts]
    return out


def _embedding(record: RunRecord) -> str | None:
    return next((n for n, i in record.layers.items() if i.kind == "embedding"), None)


def _head_shared(record: RunRecord, embedding: Format, head: Format) -> bool:
    """Whether the export stores the head with the embedding (once)."""
    emb = _embedding(record)
    return (record.tied_lm_head and emb is not None
            and shares_tied_weight(embedding, head, record.layers[emb].in_features))


def _table_bytes(record: RunRecord, names) -> int:
    """fp16 bytes of the planned embeddings among ``names`` (counted in other_param_bytes)."""
    return sum(2 * record.layers[n].in_features * record.layers[n].out_features
               for n in names if record.layers[n].kind == "embedding")


def _size_costs(record: RunRecord, cands: dict[str, list[Candidate]]
                ) -> dict[str, list[Candidate]]:
    """Candidates costed by what they add to the exported file: a tied head stored with
    the embedding adds nothing (a planned embedding is pinned: one candidate)."""
    if not record.tied_lm_head or "lm_head" not in cands:
        return cands
    emb = cands.get(_embedding(record))
    emb_fmt = emb[0].fmt if emb else FP16()
    head = [replace(c, nbytes=0) if _head_shared(record, emb_fmt, c.fmt) else c
            for c in cands["lm_head"]]
    return {**cands, "lm_head": head}


_SUGGEST = (Int4(128), Int4(64), Int4(32), Int4(128, symmetric=True), Int4(64, symmetric=True),
            Int4(32, symmetric=True))


def _names(cands: dict[str, list[Candidate]]) -> str:
    """The candidate formats as the user gave them, e.g. ``int8,w8a8`` (and the rules, when
    some layer is pinned to one candidate)."""
    seen = dict.fromkeys(c.fmt.name for cs in cands.values() for c in cs
                         if not isinstance(c.fmt, FP16))
    ruled = any(len(cs) == 1 for cs in cands.values())
    return (",".join(seen) or "fp16") + (" under these --keep/--force rules" if ruled else "")


def _would_reach(record: RunRecord, cands: dict[str, list[Candidate]],
                 fits: Callable[[int], bool]) -> str:
    """``, or add F to calibrate's --formats`` for the first format whose addition
    makes the smallest plan's bytes ``fits``; empty when none does. Layers pinned by a rule
    (one candidate) keep theirs."""
    have = {c.fmt for cs in cands.values() for c in cs}
    for fmt in (f for f in _SUGGEST if f not in have):
        lo = sum(min([c.nbytes for c in cs] + ([fmt.weight_bytes(
            record.layers[n].out_features, record.layers[n].in_features)]
            if len(cs) > 1 else [])) for n, cs in cands.items())
        if fits(lo):
            return f", or add {fmt.name} to calibrate's --formats"
    return ""


def _weights(record: RunRecord, names) -> int:
    """Weight elements of the layers ``names``, the denominator of bits per weight. A tied
    head is the embedding table, not a weight of its own: it is never counted, so keeping
    it with the table costs 0 bits and storing it apart adds its bytes and no weights
    (quantizing it can never lower bits per weight while the file grows)."""
    return sum(record.layers[n].in_features * record.layers[n].out_features for n in names
               if not (record.tied_lm_head and n == "lm_head"))


def bits_range(record: RunRecord, cands: dict[str, list[Candidate]]) -> tuple[float, float]:
    """Smallest and largest bits per weight any assignment of ``cands`` stores (a tied head
    stored with the embedding costs 0 bits)."""
    weights = _weights(record, cands)
    lo, hi = feasible_bytes(_size_costs(record, cands))
    return 8 * lo / weights, max(8 * hi / weights, 16.0)


def _target_bits(budget: Budget, cands: dict[str, list[Candidate]], record: RunRecord,
                 speed: SpeedProblem | None = None) -> dict[str, Candidate]:
    """Least score within ``budget.value`` stored bits per weight; a tied head stored with
    the embedding table costs 0 bits, so quantizing it saves nothing."""
    weights, given = _weights(record, cands), cands
    cands = _size_costs(record, cands)
    lo_b, hi_b = bits_range(record, cands)
    if budget.value < lo_b:
        lowest = math.ceil(lo_b * 1000) / 1000
        more = _would_reach(record, cands, lambda b: 8 * b / weights <= budget.value)
        raise QuantcalError(
            f"--target-bits {budget.value:g} cannot be met with formats {_names(cands)}: "
            f"they reach {lo_b:.3f} to {hi_b:.3f} bits/weight (feasible range); "
            f"pass --target-bits {lowest:g} or more{more}")
    if budget.value > hi_b:
        raise QuantcalError(f"--target-bits {budget.value:g} is above the feasible range "
                            f"{lo_b:.3f} to {hi_b:.3f} bits/weight (the largest plan); pass "
                            f"--target-bits {hi_b:g} or less")
    least = feasible_bytes(cands)[0]  # a budget rounded to lo_b may floor below it
    return _solve_costed(record, given, speed,
                         max_bytes=max(int(budget.value * weights // 8), least))


def _solve_costed(record: RunRecord, cands: dict[str, list[Candidate]],
                  speed: SpeedProblem | None = None, **limit) -> dict[str, Candidate]:
    """:func:`solve` with each candidate costed by what it adds to the export (a tied head
    stored with the embedding: nothing) and the speed side of the program (``--min-tok-s``,
    ``--prefer-fusable``); returns the candidates as given."""
    costed = _size_costs(record, cands)
    try:
        picked = solve(costed, **limit, **(speed.solver_kwargs() if speed else {}))
    except QuantcalError:
        if speed is None or speed.options.min_tok_s is None:
            raise
        raise speed.unreachable(costed, limit) from None
    return {n: next(c for c in cands[n] if c.fmt == p.fmt) for n, p in picked.items()}


def _max_size(budget: Budget, cands: dict[str, list[Candidate]], record: RunRecord,
              speed: SpeedProblem | None = None) -> dict[str, Candidate]:
    costed = _size_costs(record, cands)
    lo, most = feasible_bytes(costed)
    weights = sum(record.layers[n].in_features * record.layers[n].out_features for n in cands)
    hi = 2 * weights - (2 * record.layers["lm_head"].in_features
                        * record.layers["lm_head"].out_features
                        if record.tied_lm_head and "lm_head" in cands else 0)
    hi = max(hi, most)  # rules can force more: a quantized table and its own fp16 head
    outside = record.other_param_bytes - _table_bytes(record, cands)
    low_mb, high_mb = (lo + outside) / 1e6, (hi + outside) / 1e6
    if budget.value < lo + outside:
        more = _would_reach(record, costed, lambda b: b + outside <= budget.value)
        raise QuantcalError(
            f"--max-size {budget.value / 1e6:.2f}MB cannot be met with formats "
            f"{_names(cands)}: the model takes {low_mb:.2f}MB to "
            f"{high_mb:.2f}MB (feasible range); pass --max-size "
            f"{math.ceil(low_mb * 100) / 100:.2f}MB or more{more}")
    if budget.value > hi + outside:
        raise QuantcalError(f"--max-size {budget.value / 1e6:.2f}MB is above the feasible "
                            f"range {low_mb:.2f}MB to {high_mb:.2f}MB (the largest plan); pass "
                            f"--max-size {math.floor(high_mb * 100) / 100:.2f}MB or less")
    return _solve_costed(record, cands, speed, max_bytes=int(budget.value - outside))


def _solve_budget(budget: Budget, cands: dict[str, list[Candidate]], record: RunRecord,
                  speed: SpeedProblem | None = None) -> dict[str, Candidate]:
    """Solve under ``budget``; an unreachable budget names the feasible range, the value to
    pass instead and a format that would reach it."""
    # a budget is an upper bound: above what the rules allow it is slack, not an error;
    # only below the smallest assignment or above all-fp16 is it impossible
    if budget.value is None or not math.isfinite(budget.value) or budget.value <= 0:
        raise QuantcalError(f"budget {budget.kind} = {budget.value}: give a finite number "
                            "above 0")
    if budget.kind == "target_bits":
        return _target_bits(budget, cands, record, speed)
    if budget.kind == "max_size":
        return _max_size(budget, cands, record, speed)
    if budget.kind == "max_kl":
        least = sum(min(c.score for c in cs) for cs in cands.values())
        if budget.value < least:
            raise QuantcalError(
                f"--max-kl {budget.value:g} cannot be met: the layers these rules pin "
                f"predict {least:.4g} nats/token at the least; pass --max-kl {least:.4g} or "
                "more, or drop a --force rule")
        return _solve_costed(record, cands, speed, max_score=budget.value)
    raise QuantcalError(f"budget {budget.kind!r} cannot be planned; use --target-bits, "
                        "--max-size or --max-kl")


def default_budget(record: RunRecord, cands: dict[str, list[Candidate]]) -> Budget:
    """``DEFAULT_BITS`` bits per weight, moved into the feasible range if needed (e.g. a
    hidden size of 576 pads int4-g128 groups, so 4.5 bits may be below all-int4, and
    ``--formats int8,w8a8`` reach 8.25 bits at the least); a logged notice says so and
    names a format that would reach the default."""
    weights = _weights(record, cands)
    lo, hi = bits_range(record, cands)
    if lo <= DEFAULT_BITS:
        return Budget("target_bits", DEFAULT_BITS)
    bits = math.ceil(lo * 1000) / 1000
    more = _would_reach(record, _size_costs(record, cands),
                        lambda b: 8 * b / weights <= DEFAULT_BITS)
    log.warning(f"quantcal: no budget given, and the default {DEFAULT_BITS} bits/weight is "
                f"below what formats {_names(cands)} reach ({lo:.3f} to {hi:.3f}); planning "
                f"for {bits:g}; pass --target-bits to choose{more}")
    return Budget("target_bits", bits)


def make_plan(record: RunRecord, sens: SensitivityRecord, budget: Budget | None,
              rules: Rules, speed: SpeedOptions | None = None) -> Plan:
    """Solve for ``budget`` (None: :func:`default_budget`) under ``rules`` and ``speed``'s
    goals (None: none; predicted with the shipped latency table) and describe the result as
    a Plan."""
    for flag, given in (("--max-kl", budget is not None and budget.kind == "max_kl"),
                        ("--prefer-fusable", speed and speed.prefer_fusable is not None)):
        if given and sens.method != "exact":
            raise QuantcalError(f"{flag} needs exact sensitivities (KL); the fast proxy is not "
                                "in KL units: re-run `quantcal calibrate --sensitivity exact`")
    speed = speed or SpeedOptions.default()
    embeddings = embedding_candidates(record, sens.formats)
    cands, reasons = apply_rules({**candidates(record, sens), **embeddings}, rules,
                                 optional=embeddings)
    budget = budget or default_budget(record, cands)
    timed, problem = speed_problem(record, cands, speed)
    chosen = _solve_budget(budget, timed, record, problem)
    tok_s, share, how = predict(record, {n: c.fmt for n, c in chosen.items()}, speed)
    layers = {}
    for name, c in chosen.items():
        info = record.layers[name]
        bits = 8 * c.nbytes / (info.out_features * info.in_features)
        latency = None if name in embeddings else round(share[name], 4)
        layers[name] = LayerPlan(c.fmt, bits=round(bits, 4), bytes=c.nbytes,
                                 score=None if name in embeddings else c.score,
                                 reason=reasons[name], latency_us=latency)
    return replace(describe(record, layers, budget), predicted_by=sens.method,
                   score_windows=sens.samples, predicted_tok_s=tok_s, speed=how)


def _float_bytes(fmt: Format, n: int, k: int, embedding: bool) -> int:
    """Bytes of a layer's floating-point tensors in the fp16 export (a whole fp16 weight;
    the scales of a quantized one): the CPU export stores them in fp32, twice as many."""
    return fmt.embedding_float_bytes(n, k) if embedding else fmt.float_bytes(n, k)


def _stored(record: RunRecord, layers: Mapping[str, LayerPlan]) -> dict[str, LayerPlan]:
    """The layers the export stores apart: all but a tied head stored with the embedding."""
    emb = layers.get(_embedding(record) or "")
    head = layers.get("lm_head")
    if head is not None and _head_shared(record, emb.format if emb else FP16(), head.format):
        return {n: p for n, p in layers.items() if n != "lm_head"}
    return dict(layers)


def describe(record: RunRecord, layers: dict[str, LayerPlan], budget: Budget,
             kl_measured: float | None = None) -> Plan:
    """A Plan with totals and predicted sizes (fp16 and fp32 exports) from its layers; a
    tied head stored with the embedding costs 0 bits."""
    weights = _weights(record, layers)
    stored = _stored(record, layers)
    nbytes = sum(p.bytes for p in stored.values())
    outside = record.other_param_bytes - _table_bytes(record, layers)  # all floats
    floats = outside + sum(_float_bytes(p.format, record.layers[n].out_features,
                                        record.layers[n].in_features,
                                        record.layers[n].kind == "embedding")
                           for n, p in stored.items())
    totals: dict[str, float] = {"bits_per_weight": 8 * nbytes / weights,
                                "planned_bytes": float(nbytes), "layers": float(len(layers))}
    if len(stored) < len(layers):
        totals["lm_head_shares_embedding"] = 1.0
    for p in layers.values():
        totals[f"layers_{p.format.name}"] = totals.get(f"layers_{p.format.name}", 0.0) + 1
    return Plan(model=record.config.model, layers=layers, budget=budget, totals=totals,
                predicted_size_bytes=nbytes + outside,
                predicted_size_fp32_bytes=nbytes + outside + floats,
                kl_predicted=sum(p.score or 0.0 for p in layers.values()),
                kl_measured=kl_measured)


def check_budget(record: RunRecord, budget: Budget | None, rules: Rules) -> None:
    """Fail early (before any statistics) on a budget or rule that no plan can meet."""
    zero = {n: {f.name: 0.0 for f in record.config.formats} for n, i in record.layers.items()
            if i.kind != "embedding"}
    sens = SensitivityRecord("exact" if record.config.sensitivity == "exact" else "fast",
                             record.config.formats, zero)
    make_plan(record, sens, budget, rules)


def plan_kl(model: nn.Module, plan: Plan, qparams: Mapping[str, torch.Tensor],
            held_out: torch.Tensor, *, batch_size: int, device: torch.device) -> float:
    """Mean KL (nats/token) of the model with the whole plan applied, on ``held_out``."""
    return plans_kl(model, [plan], qparams, held_out, batch_size=batch_size, device=device)[0]


@torch.inference_mode()
def plans_kl(model: nn.Module, plans: Sequence[Plan], qparams: Mapping[str, torch.Tensor],
             held_out: torch.Tensor, *, batch_size: int, device: torch.device) -> list[float]:
    """:func:`plan_kl` of each of ``plans``, the FP reference run once per batch for all."""
    formats = [{n: p.format for n, p in plan.layers.items()} for plan in plans]
    totals = [0.0] * len(plans)
    for batch in held_out.split(batch_size):
        batch = batch.to(device)
        ref = torch.log_softmax(model(batch, use_cache=False).logits.float(), dim=-1)
        for i, fmts in enumerate(formats):
            with swapped(model, fake_quant_modules(model, fmts, qparams)):
                logq = torch.log_softmax(model(batch, use_cache=False).logits.float(), dim=-1)
            totals[i] += float((ref.exp() * (ref - logq)).sum(-1).mean()) * batch.shape[0]
    return [t / held_out.shape[0] for t in totals]
