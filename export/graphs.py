"""``build_decoder``: the ONNX graph of a loaded model, by its family's ``Graph`` kind.

One builder per :class:`quantcal.families.Graph` member, looked up by the family
description (never by class name); a kind without a builder fails at import.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from quantcal.export.builder import ExternalData, GraphBuilder
from quantcal.export.decoder import build_llama
from quantcal.export.decoder_gpt2 import build_gpt2
from quantcal.families import Graph
from quantcal.formats import Format
from quantcal.models import family_of

Builder = Callable[..., GraphBuilder]  # (model, formats, qparams, dtype, *, fuse, data)
BUILDERS: dict[Graph, Builder] = {Graph.ROTARY: build_llama, Graph.GPT2: build_gpt2}
if set(BUILDERS) != set(Graph):  # pragma: no cover - a new graph kind needs its builder
    raise ImportError(f"no ONNX builder for {set(Graph) - set(BUILDERS)}")


def build_decoder(model: nn.Module, formats: Mapping[str, Format],
                  qparams: Mapping[str, torch.Tensor], dtype, *, fuse: bool = True,
                  data: ExternalData | None = None) -> GraphBuilder:
    """The decoder graph of ``model`` under ``formats`` (``dtype``: activation dtype;
    ``fuse``: layers that read one input and share a format as one node,
    :mod:`quantcal.export.fusion`; the builder's ``fused`` names them; ``data``: the file
    the weights are written to as they come, :class:`ExternalData`, else kept in memory)."""
    return BUILDERS[family_of(model).graph](model, formats, qparams, dtype, fuse=fuse,
                                            data=data)
