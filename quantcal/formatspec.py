"""The format registry: each concrete format type's stage handlers, and the check that no
format lacks a piece.

A format is declared in two halves. Its class in :mod:`quantcal.formats` holds what needs
no torch: name and bits, size, speed (export layout, kernel family, decode traffic) and
roles (fusable, embeddable, static activations). Its :class:`FormatSpec` holds what the
stages run: its qparams (calibrate), its fake-quant weight (the torch reference every stage
compares against), its ONNX emitter and the op counts that emitter implies (export), and
for an embeddable format the same three for the token embedding. Every spec is declared in
:mod:`quantcal.formatdefs`, the one module that imports the stages' handlers; stages look
a format's up by ``type(fmt)`` (:func:`spec_of`), never by name or by an isinstance chain.

:func:`missing_pieces` names what one format type lacks of either half;
:func:`check_formats` raises one QuantcalError naming every concrete format type that lacks
something, and what. It runs as :mod:`quantcal.formatdefs` is imported, which the first
lookup of any stage does (:func:`specs`; the stage modules cannot import it at their top,
as it imports them), and so does the import of :mod:`quantcal.export.fusion`: a format
missing a piece fails there with that message, not as a KeyError inside a stage.

Imports no torch; reads and writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Mapping

from quantcal.errors import QuantcalError
from quantcal.formats import EXPORT_LAYOUTS, KERNEL_FAMILIES, Format

Handler = Callable[..., Any]
CLASS_METHODS = ("name", "weight_bits", "weight_bytes", "float_bytes")  # Format's to override
CLASS_TRAITS = {"export_layout": EXPORT_LAYOUTS, "kernel_family": KERNEL_FAMILIES}


def _piece(embedding: bool = False) -> Any:
    return field(default=None, metadata={"embedding": embedding})


@dataclass(frozen=True)
class FormatSpec:
    """The stage handlers of one format type; a ``None`` is a missing piece. With ``fmt``
    the format and ``qp`` its qparams (``{scale, zero[, codes]}``, ``{}`` for fp16):

    - ``qparams(fmt, w, stats, method)``: qparams of an ``(N, K)`` weight, from the layer's
      :class:`~quantcal.calibrate.stats.LayerStats` and the weight method (aware | rtn).
    - ``fake_weight(fmt, w, qp)``: the ``(N, K)`` float32 weight the export multiplies by.
    - ``emit_linear(b, layer, x, w, fmt, qp, act_qp)``: append ``x @ w_hat^T`` (no bias) to
      a GraphBuilder; returns the output's name.
    - ``linear_ops(fmt)``: the nodes ``emit_linear`` appends, keyed as
      :func:`quantcal.export.emit.graph_op_counts` counts them.
    - ``embedding_qparams(fmt, table, method)``, ``emit_embedding(b, layer, ids, table, fmt,
      qp)``, ``embedding_ops(fmt)``: the same for a ``(V, H)`` token embedding; required
      only of an embeddable format.
    """

    qparams: Handler | None = _piece()
    fake_weight: Handler | None = _piece()
    emit_linear: Handler | None = _piece()
    linear_ops: Handler | None = _piece()
    embedding_qparams: Handler | None = _piece(embedding=True)
    emit_embedding: Handler | None = _piece(embedding=True)
    embedding_ops: Handler | None = _piece(embedding=True)


_SPECS: dict[type[Format], FormatSpec] = {}


def declare(spec: FormatSpec, *types: type[Format]) -> None:
    """Make ``spec`` the handlers of each of ``types`` (a type is declared once: again
    with the same spec, as a retried import of quantcal.formatdefs does, changes nothing)."""
    for t in types:
        if _SPECS.get(t, spec) != spec:
            raise QuantcalError(f"format {t.__qualname__} is declared twice")
        _SPECS[t] = spec


def specs() -> Mapping[type[Format], FormatSpec]:
    """Every declared format type's spec, in declaration order; the first call imports
    :mod:`quantcal.formatdefs`, which declares them all and checks them."""
    import quantcal.formatdefs  # noqa: F401  (declares every format, then checks)

    return _SPECS


def spec_of(fmt: Format) -> FormatSpec:
    """The handlers of ``type(fmt)``; a QuantcalError naming it when none were declared."""
    spec = specs().get(type(fmt))
    if spec is None:
        raise QuantcalError(
            f"format {fmt!r} has no FormatSpec (declared: "
            f"{', '.join(t.__name__ for t in _SPECS)}); declare one in quantcal.formatdefs")
    return spec


def concrete_formats(root: type[Format] = Format) -> list[type[Format]]:
    """Every subclass of ``root`` (depth first, each once) not declared ``base=True``."""
    out: list[type[Format]] = []
    for sub in root.__subclasses__():
        for t in ([] if sub.is_base else [sub]) + concrete_formats(sub):
            if t not in out:
                out.append(t)
    return out


def missing_pieces(cls: type[Format], spec: FormatSpec | None = None) -> list[str]:
    """What the format type ``cls`` lacks, by name ([] when nothing): the methods of
    :data:`CLASS_METHODS` it leaves to Format, the :data:`CLASS_TRAITS` it does not set to
    a known value, then the :class:`FormatSpec` fields (of ``spec``, default the one
    declared for ``cls``) that are None; the embedding ones only if ``cls.embeddable``."""
    missing = [m for m in CLASS_METHODS if getattr(cls, m) is getattr(Format, m)]
    missing += [t for t, known in CLASS_TRAITS.items() if getattr(cls, t) not in known]
    spec = spec if spec is not None else _SPECS.get(cls)
    for f in fields(FormatSpec):
        if (cls.embeddable or not f.metadata["embedding"]) and (
                spec is None or getattr(spec, f.name) is None):
            missing.append(f.name)
    return missing


def _where(pieces: list[str]) -> str:
    """``pieces`` said with where each is declared."""
    on_class = [p for p in pieces if p in CLASS_METHODS or p in CLASS_TRAITS]
    in_spec = [p for p in pieces if p not in on_class]
    parts = []
    if on_class:
        parts.append(f"{', '.join(on_class)} (on the class, as quantcal.formats' do)")
    if in_spec:
        parts.append(f"{', '.join(in_spec)} (its FormatSpec, quantcal.formatdefs)")
    return " and ".join(parts)


def check_formats(types: Iterable[type[Format]] | None = None) -> None:
    """Raise one QuantcalError naming each of ``types`` (default: every concrete format
    type, :func:`concrete_formats`) that lacks a piece, and the pieces it lacks."""
    gaps = {t: missing_pieces(t) for t in (concrete_formats() if types is None else types)}
    lines = [f"{t.__module__}.{t.__qualname__} lacks {_where(m)}" for t, m in gaps.items() if m]
    if lines:
        raise QuantcalError("incomplete format declarations: " + "; ".join(lines))
