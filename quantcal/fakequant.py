"""Fake quantization of a torch model from calibrated qparams: the reference every stage
compares against (sensitivity, plan KL, export parity, the torch evaluation backend).

``quantized_weight`` turns a layer's qparams for one format into the dequantized ``(N, K)``
weight the exported model will multiply by (GPTQ codes when present, else the codes the
qparams give), with the handler the format's :class:`~quantcal.formatspec.FormatSpec`
names (``fake_weight``, the ones below). ``FakeQuantLinear`` stands in for an ``nn.Linear``
or GPT-2 ``Conv1D``: it multiplies by that weight and, for a format with a static
activation scale (``w8a8``), first fake-quantizes its input with it.
``FakeQuantEmbedding`` stands in for the token embedding: its rows are the dequantized
table. A head tied to the embedding shares one ``nn.Parameter`` with it; each gets its own
stand-in (the modules are swapped, never the parameter), and an embedding planned in its
tied head's format uses the head's qparams (:func:`embedding_qparams`), as the export
stores that matrix once for both. ``swapped`` swaps stand-ins in for a set of layers and
always restores the originals.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
from torch import nn

from quantcal import qmath
from quantcal.errors import QuantcalError
from quantcal.formats import FP16, W8A8, BlockQuant, Format
from quantcal.formatspec import spec_of

ACT_BITS = 8


def block_weight(fmt: BlockQuant, w: torch.Tensor, qp: Mapping[str, torch.Tensor]
                 ) -> torch.Tensor:
    """``(codes - zero) * scale`` per group: the GPTQ codes, else ``w`` rounded."""
    scale, zero = qp["scale"].to(w.device), qp["zero"].to(w.device)
    codes = qp.get("codes")
    if codes is None:
        codes = qmath.quantize_weight(w, scale, zero, fmt.bits, fmt.group_size)
    return qmath.dequantize_weight(codes.to(w.device), scale, zero, fmt.group_size)


def w8a8_weight(fmt: W8A8, w: torch.Tensor, qp: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``w`` rounded to int8 per output channel and back."""
    return qmath.fake_quant_weight(w.float(), qp["scale"].to(w.device), qp["zero"].to(w.device),
                                   8, None)


def fp16_weight(fmt: FP16, w: torch.Tensor, qp: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``w`` itself (in float32)."""
    return w.float()


def quantized_weight(fmt: Format, w: torch.Tensor, qp: Mapping[str, torch.Tensor]
                     ) -> torch.Tensor:
    """The dequantized ``(N, K)`` float32 weight of ``w`` under ``fmt`` and its qparams."""
    return spec_of(fmt).fake_weight(fmt, w.float(), qp)


class FakeQuantLinear(nn.Module):
    """``y = fq(x) @ w_hat^T + b``; stands in for a Linear or Conv1D of the same shapes."""

    def __init__(self, w_hat: torch.Tensor, bias: torch.Tensor | None,
                 act: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.register_buffer("weight", w_hat)  # (N, K)
        self.bias = bias
        self.act = act  # (scale, zero) of the static uint8 activation quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            scale, zero = self.act
            x = qmath.fake_quant(x, scale.to(x.device), zero.to(x.device), ACT_BITS)
        return nn.functional.linear(x, self.weight.to(x.dtype),
                                    None if self.bias is None else self.bias.to(x.dtype))


class FakeQuantEmbedding(nn.Module):
    """``w_hat[ids]``, times the original's ``embed_scale`` where it has one (Gemma's
    sqrt(hidden), applied in the table's dtype as HF does); stands in for an ``nn.Embedding``
    with a ``(V, H)`` table."""

    def __init__(self, w_hat: torch.Tensor, embed_scale: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", w_hat)  # (V, H)
        self.embed_scale = embed_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(ids, self.weight)  # (..., H)
        if self.embed_scale is None:
            return rows
        return rows * self.embed_scale.to(self.weight.dtype)


def fake_quant_module(module: nn.Module, fmt: Format, qp: Mapping[str, torch.Tensor],
                      act_qp: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """A :class:`FakeQuantLinear` for ``module`` (whose ``(N, K)`` weight is ``w``), or a
    :class:`FakeQuantEmbedding` for an ``nn.Embedding`` (``(V, H)`` table, groups along H)."""
    from quantcal.models import weight_matrix

    if isinstance(module, nn.Embedding):
        if not fmt.embeddable or isinstance(fmt, FP16):
            raise QuantcalError(f"an embedding takes a weight-only format (int8, int4-gN), "
                                f"not {fmt.name}")
        table = module.weight.detach()
        scale = getattr(module, "embed_scale", None)
        if scale is not None and not torch.is_tensor(scale):
            scale = torch.tensor(scale)
        return FakeQuantEmbedding(quantized_weight(fmt, table, qp).to(table.dtype), scale)
    w = weight_matrix(module).detach()
    w_hat = quantized_weight(fmt, w, qp).to(w.dtype)
    act = None
    if fmt.static_activations:
        if act_qp is None:
            raise QuantcalError(f"{fmt.name} needs the layer's activation qparams; re-run "
                                f"`quantcal calibrate` with {fmt.name} among --formats")
        act = (act_qp["scale"], act_qp["zero"])
    return FakeQuantLinear(w_hat, module.bias, act)


def _swap(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old


@contextlib.contextmanager
def swapped(model: nn.Module, replacements: Mapping[str, nn.Module]) -> Iterator[nn.Module]:
    """Temporarily replace submodules by name; the originals always come back."""
    originals: dict[str, nn.Module] = {}
    try:
        for name, new in replacements.items():
            originals[name] = _swap(model, name, new)
        yield model
    finally:
        for name, old in originals.items():
            _swap(model, name, old)


def layer_qparams(qparams: Mapping[str, torch.Tensor], layer: str, fmt: Format
                  ) -> dict[str, torch.Tensor]:
    """``{scale, zero[, codes]}`` of ``layer`` for ``fmt`` from a qparams.safetensors mapping."""
    prefix = f"{layer}/{fmt.name}/"
    found = {k[len(prefix):]: qparams[k] for k in qparams if k.startswith(prefix)}
    if not found and not isinstance(fmt, FP16):
        raise QuantcalError(f"qparams.safetensors has no {fmt.name} qparams for {layer}; "
                            f"re-run `quantcal calibrate` with {fmt.name} among --formats")
    return found


def act_qparams(qparams: Mapping[str, torch.Tensor], layer: str) -> dict[str, torch.Tensor] | None:
    prefix = f"{layer}/act/"
    found = {k[len(prefix):]: qparams[k] for k in qparams if k.startswith(prefix)}
    return found or None


def embedding_qparams(model: nn.Module, name: str, formats: Mapping[str, Format],
                      qparams: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The qparams of the token embedding ``name`` for its format in ``formats``: its tied
    head's when the head has the same format (one quantized matrix serves both), else its own.
    """
    from quantcal.models import family_of

    fmt = formats[name]
    head_name = family_of(model).lm_head
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_submodule(name).weight
    source = head_name if tied and formats.get(head_name) == fmt else name
    return layer_qparams(qparams, source, fmt)


def fake_quant_modules(model: nn.Module, formats: Mapping[str, Format],
                       qparams: Mapping[str, torch.Tensor]) -> dict[str, nn.Module]:
    """Fake-quant stand-ins for every layer whose format is not fp16, embedding included."""
    out = {}
    for name, fmt in formats.items():
        if isinstance(fmt, FP16):
            continue
        module = model.get_submodule(name)
        if isinstance(module, nn.Embedding):
            out[name] = fake_quant_module(module, fmt,
                                          embedding_qparams(model, name, formats, qparams))
        else:
            out[name] = fake_quant_module(module, fmt, layer_qparams(qparams, name, fmt),
                                          act_qparams(qparams, name))
    return out
