"""Every format's stage handlers, declared in one place and checked as this module loads.

One :class:`~quantcal.formatspec.FormatSpec` per concrete format type of
:mod:`quantcal.formats`: which qparams (:mod:`quantcal.calibrate.qparams`), fake-quant
weight (:mod:`quantcal.fakequant`), ONNX emitter and op counts (:mod:`quantcal.export.emit`)
are its own, for its linear layers and, if it is embeddable, for the token embedding. The
stages look them up by type through :func:`quantcal.formatspec.spec_of`.

Adding a format (a prepacked fpA_intB layout, a new variant) is its class in
:mod:`quantcal.formats` (math, size, speed) and one ``declare`` here, naming the handlers
it shares with a format it resembles and the ones it brings (written beside their stage's
others). :func:`~quantcal.formatspec.check_formats` at the end refuses to load, naming the
format and the pieces, while any concrete format type lacks one.

Imports the stage modules that hold the handlers (torch, onnx); none of them imports this
module at load time (:func:`quantcal.formatspec.specs` does, at the first lookup). Reads and
writes nothing.
"""

from __future__ import annotations

from quantcal import fakequant
from quantcal.calibrate import qparams
from quantcal.export import emit
from quantcal.formats import FP16, W8A8, Int4, Int8
from quantcal.formatspec import FormatSpec, check_formats, declare

FP16_SPEC = FormatSpec(
    qparams=qparams.no_qparams, fake_weight=fakequant.fp16_weight,
    emit_linear=emit.emit_matmul, linear_ops=emit.matmul_ops,
    embedding_qparams=qparams.no_embedding_qparams, emit_embedding=emit.emit_gather,
    embedding_ops=emit.gather_ops)

BLOCK_SPEC = FormatSpec(
    qparams=qparams.block_qparams, fake_weight=fakequant.block_weight,
    emit_linear=emit.emit_matmulnbits, linear_ops=emit.matmulnbits_ops,
    embedding_qparams=qparams.block_embedding_qparams,
    emit_embedding=emit.emit_gather_block_quantized,
    embedding_ops=emit.gather_block_quantized_ops)

W8A8_SPEC = FormatSpec(
    qparams=qparams.w8a8_qparams, fake_weight=fakequant.w8a8_weight,
    emit_linear=emit.emit_qdq, linear_ops=emit.qdq_ops)

declare(FP16_SPEC, FP16)
declare(BLOCK_SPEC, Int4, Int8)
declare(W8A8_SPEC, W8A8)
check_formats()
