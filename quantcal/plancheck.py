"""Checking a plan against its run: what ``quantcal export`` does with a plan a user edited.

A plan may be edited by hand (change a layer's format, drop entries). It must name only
layers of the model and formats the run has qparams for; layers it leaves out stay fp16.
The token embedding may be fp16 or a weight-only block format (``int8``, ``int4-gN``,
exported through GatherBlockQuantized); ``w8a8`` quantizes a layer's input activations, and
an embedding has none.
"""

from __future__ import annotations

from typing import Iterable

from quantcal.config import LayerPlan, Plan, RunRecord
from quantcal.errors import QuantcalError
from quantcal.formats import FP16, BlockQuant, Format


def resolved_formats(plan: Plan, record: RunRecord, calibrated: Iterable[str]
                     ) -> dict[str, Format]:
    """Every planned-for layer's format (fp16 where the plan is silent), the token
    embedding's included, or a clear error.

    Args:
        calibrated: names of the formats ``qparams.safetensors`` holds.
    """
    have = set(calibrated)
    unknown = [n for n in plan.layers if n not in record.layers]
    if unknown:
        example = next(n for n, i in record.layers.items() if i.kind != "embedding")
        raise QuantcalError(
            f"plan names {len(unknown)} layer(s) the model does not have, e.g. {unknown[0]!r} "
            f"(layer names look like {example!r}); fix the plan or re-run `quantcal plan`")
    out: dict[str, Format] = {}
    for name, info in record.layers.items():
        entry: LayerPlan | None = plan.layers.get(name)
        fmt = entry.format if entry else FP16()
        if info.kind == "embedding" and not isinstance(fmt, (FP16, BlockQuant)):
            raise QuantcalError(
                f"plan asks for {fmt.name} for the embedding {name}; an embedding takes fp16, "
                "int8 or int4-gN (w8a8 quantizes a layer's input activations, and an "
                "embedding has none)")
        if not isinstance(fmt, FP16) and fmt.name not in have:
            raise QuantcalError(
                f"plan asks for {fmt.name} for {name}, but the run has no {fmt.name} qparams "
                f"(it has {', '.join(sorted(have)) or 'none'}); re-run `quantcal calibrate "
                f"--formats ...` including {fmt.name}, or pick one of those")
        out[name] = fmt
    return out
