"""Uniform plans beside the mixed one: the planner has to earn its place.

For every candidate format of the run but fp16, the *uniform* rival puts every layer the
rules leave free in that format (layers a rule pins keep their pinned format, the embedding
stays as the rules say); it competes only when it is no larger than the mixed plan (its
predicted fp16 export size). :func:`rivals` builds them; each is measured on the same
held-out windows as the mixed plan (every layer quantized at once, the FP reference run
once for all: :func:`quantcal.calibrate.plans.plans_kl`), and :func:`settle` keeps the mixed
plan unless a rival's measured KL is lower, in which case that rival becomes the plan. So,
on the measuring windows, the plan written is never worse than any uniform plan of its
candidates at equal or smaller size, and ``plan.json`` says by how much it is better
(``uniform``: each rival's bits, size and measured KL; ``choice``: which one won).

Selection on the windows that also report the KL reads the winner's KL slightly low (the
minimum of a few measurements); the rivals' own figures stay in ``plan.json`` beside it.
Reads the run record, sensitivities and rules; pure (the forwards are plans_kl's).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

from quantcal.calibrate.planner import Rules, apply_rules
from quantcal.calibrate.plans import candidates, describe, embedding_candidates
from quantcal.calibrate.speed import SpeedOptions, predict
from quantcal.config import LayerPlan, Plan, RunRecord, SensitivityRecord
from quantcal.formats import FP16

MIXED = "mixed"


def rivals(record: RunRecord, sens: SensitivityRecord, plan: Plan, rules: Rules = Rules()
           ) -> dict[str, Plan]:
    """``{format name: uniform plan}`` for every non-fp16 candidate format that every free
    layer can take, no larger than ``plan``."""
    embeddings = embedding_candidates(record, sens.formats)
    cands, reasons = apply_rules({**candidates(record, sens), **embeddings}, rules,
                                 optional=embeddings)
    out = {}
    for fmt in sens.formats:
        if isinstance(fmt, FP16):
            continue
        layers = {}
        for name, options in cands.items():
            free = reasons[name] == "budget"
            pick = next((c for c in options if c.fmt == fmt), None) if free else options[0]
            if pick is None:
                break
            info = record.layers[name]
            layers[name] = LayerPlan(
                pick.fmt, bits=round(8 * pick.nbytes / (info.out_features * info.in_features),
                                     4), bytes=pick.nbytes,
                score=None if name in embeddings else pick.score,
                reason="uniform" if free else reasons[name])
        else:
            rival = describe(record, layers, plan.budget)
            if rival.predicted_size_bytes <= plan.predicted_size_bytes:
                tok_s, _, how = predict(record, {n: p.format for n, p in layers.items()},
                                        SpeedOptions.default())
                out[fmt.name] = replace(rival, predicted_by=plan.predicted_by,
                                        score_windows=plan.score_windows,
                                        predicted_tok_s=tok_s, speed=how,
                                        made_from=plan.made_from)
    return out


def settle(plan: Plan, rival_plans: dict[str, Plan], kls: Mapping[str, float]) -> Plan:
    """The mixed ``plan`` (its ``kl_measured`` set) against its uniform rivals, whose
    measured KLs are ``kls`` (by rival name): the better of them, with every rival's figures
    recorded."""
    figures, rival_plans = {}, dict(rival_plans)
    for name, rival in rival_plans.items():
        rival_plans[name] = rival = replace(rival, kl_measured=kls[name],
                                            measure_windows=plan.measure_windows)
        figures[name] = {"bits_per_weight": rival.totals["bits_per_weight"],
                         "size_bytes": float(rival.predicted_size_bytes),
                         "kl_measured": rival.kl_measured}
    best = min(rival_plans, key=lambda n: rival_plans[n].kl_measured, default=None)
    if best is not None and rival_plans[best].kl_measured < plan.kl_measured:
        figures[MIXED] = {"bits_per_weight": plan.totals["bits_per_weight"],
                          "size_bytes": float(plan.predicted_size_bytes),
                          "kl_measured": plan.kl_measured}
        return replace(rival_plans[best], uniform=figures, choice=f"uniform {best}")
    return replace(plan, uniform=figures, choice=MIXED)


def comparison(plan: Plan) -> str:
    """One phrase for the plan line: the best uniform rival and how the plan compares."""
    others = {n: f for n, f in plan.uniform.items() if n != MIXED}
    if plan.kl_measured is None or not plan.uniform:
        return ""
    if plan.choice != MIXED:
        mixed = plan.uniform[MIXED]["kl_measured"]
        return (f"; chose the {plan.choice} plan: its measured KL {plan.kl_measured:.4g} is "
                f"below the mixed plan's {mixed:.4g} at no larger size")
    if not others:
        return "; no uniform plan of its formats is as small"
    name, best = min(others.items(), key=lambda kv: kv[1]["kl_measured"])
    ratio = best["kl_measured"] / plan.kl_measured if plan.kl_measured > 0 else float("inf")
    return (f"; best uniform plan no larger: {name} ({best['bits_per_weight']:.3f} bits, KL "
            f"{best['kl_measured']:.4g}): the mixed plan's KL is {ratio:.2f}x lower")
