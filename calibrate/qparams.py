"""Per-layer qparams for every candidate format, from weights and calibration statistics.

One handler per format type, declared in the format's
:class:`~quantcal.formatspec.FormatSpec` (:mod:`quantcal.formatdefs`) and looked up by
``type(fmt)``: weight-only block formats get
per-group scales/zero points (activation-aware clipping by default, RTN on request; GPTQ
codes when the layer's statistics hold an X^T X, which only single-layer callers collect);
``w8a8`` gets per-channel symmetric int8 weight scales and a per-tensor static activation
scale from the chosen observer; ``fp16`` needs nothing. With ``--hessian`` the calibrate
stage takes the block formats' qparams from the block-by-block GPTQ of
:mod:`quantcal.calibrate.gptq` instead, and the rest from here.

Weights are moved to the compute device one layer at a time (``device``), so the model may
stay on the CPU; a lazily loaded model's are read through their held block, one block in
memory at a time (:func:`layer_weights`).

The token embedding gets weight-only qparams for every embeddable block format
(:func:`compute_embedding_qparams`), groups along its hidden dimension.

Tensors are keyed ``{layer}/{format}/{scale|zero|codes}`` and ``{layer}/act/{scale|zero}`` in
``qparams.safetensors``. None is ever NaN/Inf: a non-finite result ends the stage with a
QuantcalError naming the layer and format instead of reaching the file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Callable

import torch
from torch import nn

from quantcal.calibrate import weights
from quantcal.calibrate.observers import get_observer
from quantcal.calibrate.stats import LayerStats
from quantcal.errors import QuantcalError
from quantcal.formats import FP16, W8A8, BlockQuant, Format
from quantcal.formatspec import spec_of
from quantcal.models import block_index, held_blocks, weight_matrix

QPARAMS_KIND = "qparams"
WEIGHT_METHODS = ("aware", "rtn")
ACT_BITS = 8


def _clip_qparams(fmt: BlockQuant, w: torch.Tensor, h_diag: torch.Tensor, method: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` ``(N, G)``: round to nearest, or the clip search weighted by h_diag."""
    if method == "rtn":
        return weights.rtn(w, fmt.bits, fmt.group_size, fmt.symmetric)
    return weights.aware_clip(w, h_diag, fmt.bits, fmt.group_size, fmt.symmetric)


def block_qparams(fmt: BlockQuant, w: torch.Tensor, stats: LayerStats, method: str
                  ) -> dict[str, torch.Tensor]:
    """``{scale, zero}`` ``(N, G)`` of a block format (and GPTQ ``codes`` ``(N, K)`` when
    ``stats`` holds an X^T X)."""
    if stats.xtx is not None:  # one layer's GPTQ on its own inputs (not the stage's path)
        factor = weights.gptq_factor(stats.xtx / max(stats.tokens, 1))
        scale, zero, codes = weights.gptq(w, factor, fmt.bits, fmt.group_size, fmt.symmetric,
                                          clip=method != "rtn")
        return {"scale": scale, "zero": zero, "codes": codes}
    scale, zero = _clip_qparams(fmt, w, stats.mean_sq, method)
    return {"scale": scale, "zero": zero}


def w8a8_qparams(fmt: W8A8, w: torch.Tensor, stats: LayerStats, method: str
                 ) -> dict[str, torch.Tensor]:
    """Per-output-channel symmetric int8 ``{scale, zero}``, ``(N, 1)`` each."""
    if method == "rtn":
        scale, zero = weights.rtn(w, 8, None, symmetric=True)
    else:
        scale, zero = weights.aware_clip(w, stats.mean_sq, 8, None, symmetric=True)
    return {"scale": scale, "zero": zero}  # (N, 1) each


def no_qparams(fmt: FP16, w: torch.Tensor, stats: LayerStats, method: str
               ) -> dict[str, torch.Tensor]:
    """fp16 stores the weight itself: no qparams."""
    return {}


def block_embedding_qparams(fmt: BlockQuant, table: torch.Tensor, method: str
                            ) -> dict[str, torch.Tensor]:
    """``{scale, zero}`` ``(V, G)`` of a ``(V, H)`` table, every column weighted alike."""
    uniform = torch.ones(table.shape[1], device=table.device)  # (H,)
    scale, zero = _clip_qparams(fmt, table, uniform, method)
    return {"scale": scale, "zero": zero}


def no_embedding_qparams(fmt: FP16, table: torch.Tensor, method: str
                         ) -> dict[str, torch.Tensor]:
    """An fp16 table stores itself: no qparams."""
    return {}


def format_qparams(fmt: Format, w: torch.Tensor, stats: LayerStats, method: str = "aware"
                  ) -> dict[str, torch.Tensor]:
    """Qparams of one ``(N, K)`` weight for one format, e.g. ``{"scale", "zero"[, "codes"]}``."""
    if method not in WEIGHT_METHODS:
        raise QuantcalError(f"unknown weight method {method!r}; use {', '.join(WEIGHT_METHODS)}")
    return spec_of(fmt).qparams(fmt, w, stats, method)


def activation_qparams(stats: LayerStats, observer: str) -> dict[str, torch.Tensor]:
    """Static per-tensor uint8 activation scale and zero point from ``observer``."""
    scale, zero = get_observer(observer).qparams(stats.summary(), ACT_BITS, symmetric=False)
    return {"scale": scale.reshape(()), "zero": zero.reshape(())}


def _finite(t: torch.Tensor, layer: str, fmt: str, key: str) -> torch.Tensor:
    """``t`` on the CPU, or a QuantcalError if it holds NaN/Inf (or, for a scale, <= 0)."""
    t = t.cpu()
    if not t.is_floating_point():
        return t
    ok = torch.isfinite(t).all() & ((t > 0).all() if key.endswith("scale") else True)
    if not bool(ok):
        raise QuantcalError(
            f"the {fmt} {key} of layer {layer} came out NaN/Inf or not positive: its weights "
            f"span more than float32 can scale; check the checkpoint, or drop {fmt} from "
            "--formats")
    return t


def check_weight(w: torch.Tensor, layer: str) -> None:
    """A NaN/Inf weight gives finite but meaningless qparams, so it is refused first."""
    if not bool(torch.isfinite(w).all()):
        raise QuantcalError(f"the weights of layer {layer} hold NaN/Inf: the checkpoint is "
                            "damaged; re-download or re-export it")


def keyed_qparams(layer: str, fmt: Format, qp: dict[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
    """``qp`` keyed ``{layer}/{format}/{key}`` for ``qparams.safetensors``, on the CPU;
    a QuantcalError if any is NaN/Inf (or a scale not positive)."""
    return {f"{layer}/{fmt.name}/{key}": _finite(t, layer, fmt.name, key)
            for key, t in qp.items()}


class LayerWeights(Mapping):
    """The ``(N, K)`` weights of ``modules`` (name -> module of ``model``), in their order,
    each read when looked up: a lazily loaded model's through its block, held until a
    layer of another block is looked up (:func:`quantcal.models.held_blocks`'s ``hold``),
    so walking the layers in model order reads each block once and holds one at a time.
    Not copied for a model loaded whole."""

    def __init__(self, model: nn.Module, modules: Mapping[str, nn.Module],
                 hold: Callable[..., None]):
        self._model, self._modules, self._hold = model, modules, hold

    def __getitem__(self, name: str) -> torch.Tensor:
        block = block_index(self._model, name)
        self._hold(*(() if block is None else (block,)))
        return weight_matrix(self._modules[name]).detach()

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


@contextlib.contextmanager
def layer_weights(model: nn.Module, modules: Mapping[str, nn.Module]
                  ) -> Iterator[LayerWeights]:
    """:class:`LayerWeights` of ``modules``; whatever it holds is released on exit."""
    with held_blocks(model) as hold:
        yield LayerWeights(model, modules, hold)


def compute_qparams(weights_by_layer: Mapping[str, torch.Tensor],
                    stats: dict[str, LayerStats],
                    formats: tuple[Format, ...], *, observer: str, method: str = "aware",
                    progress: bool = True, device: torch.device | str | None = None
                    ) -> dict[str, torch.Tensor]:
    """Qparams of every layer for every format, keyed for ``qparams.safetensors``.

    Args:
        weights_by_layer: ``(N, K)`` weight per layer name, wherever it lives (looked up
            once each, in its order: a :class:`LayerWeights` reads them one at a time).
        device: where to compute; each weight is moved there in turn, one layer at a time
            (None: where it lives).
    """
    from tqdm.auto import tqdm

    out: dict[str, torch.Tensor] = {}
    act_fmt = next((f for f in formats if f.static_activations), None)  # w8a8
    for name in tqdm(weights_by_layer, desc="qparams", unit="layer", disable=not progress):
        w, s = weights_by_layer[name].to(device), stats[name]
        check_weight(w, name)
        for fmt in formats:
            out.update(keyed_qparams(name, fmt, format_qparams(fmt, w, s, method)))
        if act_fmt is not None:
            for key, t in activation_qparams(s, observer).items():
                out[f"{name}/act/{key}"] = _finite(t, name, act_fmt.name, f"activation {key}")
    return out


def compute_embedding_qparams(tables: dict[str, torch.Tensor], formats: tuple[Format, ...], *,
                              method: str = "aware", device: torch.device | str | None = None
                              ) -> dict[str, torch.Tensor]:
    """Qparams of each token embedding table for every embeddable format, keyed like
    :func:`compute_qparams` (``fp16`` has none; ``w8a8`` does not apply: no activations
    feed a table).

    The groups run along H, so a ``(V, H)`` table is quantized as a MatMulNBits weight of
    N=V, K=H would be (the layout a tied head shares). An embedding's output is one row of
    its table, so every element of a row counts alike: ``aware`` is the linear layers' clip
    search with a uniform weighting (each group's clip minimises its squared reconstruction
    error, which no calibration statistic could improve on); ``rtn`` rounds to nearest.

    Args:
        tables: ``(V, H)`` table per layer name, wherever it lives.
        device: where to compute; one table at a time is moved there (None: where it lives).
    """
    if method not in WEIGHT_METHODS:
        raise QuantcalError(f"unknown weight method {method!r}; use {', '.join(WEIGHT_METHODS)}")
    out: dict[str, torch.Tensor] = {}
    for name, table in tables.items():
        table = table.to(device)
        check_weight(table, name)
        for fmt in formats:
            if fmt.embeddable:
                qp = spec_of(fmt).embedding_qparams(fmt, table, method)
                out.update(keyed_qparams(name, fmt, qp))
    return out
