"""Per-layer qparams for every candidate format, from weights and calibration statistics.

One handler per format type (looked up by ``type(fmt)``): weight-only block formats get
per-group scales/zero points (activation-aware clipping by default, GPTQ codes when X^T X was
collected, RTN on request); ``w8a8`` gets per-channel symmetric int8 weight scales and a
per-tensor static activation scale from the chosen observer; ``fp16`` needs nothing.

The token embedding gets weight-only qparams for every block format
(:func:`compute_embedding_qparams`), groups along its hidden dimension.

Tensors are keyed ``{layer}/{format}/{scale|zero|codes}`` and ``{layer}/act/{scale|zero}`` in
``qparams.safetensors``. None is ever NaN/Inf: a non-finite result ends the stage with a
QuantcalError naming the layer and format instead of reaching the file.
"""

from __future__ import annotations

from typing import Callable

import torch

from quantcal.calibrate import weights
from quantcal.calibrate.observers import get_observer
from quantcal.calibrate.stats import LayerStats
from quantcal.errors import QuantcalError
from quantcal.formats import FP16, W8A8, BlockQuant, Format, Int4, Int8

QPARAMS_KIND = "qparams"
WEIGHT_METHODS = ("aware", "rtn")
ACT_BITS = 8


def _clip_qparams(fmt: BlockQuant, w: torch.Tensor, h_diag: torch.Tensor, method: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` ``(N, G)``: round to nearest, or the clip search weighted by h_diag."""
    if method == "rtn":
        return weights.rtn(w, fmt.bits, fmt.group_size, fmt.symmetric)
    return weights.aware_clip(w, h_diag, fmt.bits, fmt.group_size, fmt.symmetric)


def _block(fmt: BlockQuant, w: torch.Tensor, stats: LayerStats, method: str
           ) -> dict[str, torch.Tensor]:
    scale, zero = _clip_qparams(fmt, w, stats.mean_sq, method)
    out = {"scale": scale, "zero": zero}
    if stats.xtx is not None and method != "rtn":
        out["codes"] = weights.gptq(w, stats.xtx, scale, zero, fmt.bits, fmt.group_size)
    return out


def _w8a8(fmt: W8A8, w: torch.Tensor, stats: LayerStats, method: str
          ) -> dict[str, torch.Tensor]:
    if method == "rtn":
        scale, zero = weights.rtn(w, 8, None, symmetric=True)
    else:
        scale, zero = weights.aware_clip(w, stats.mean_sq, 8, None, symmetric=True)
    return {"scale": scale, "zero": zero}  # (N, 1) each


def _fp16(fmt: FP16, w: torch.Tensor, stats: LayerStats, method: str) -> dict[str, torch.Tensor]:
    return {}


_HANDLERS: dict[type, Callable[..., dict[str, torch.Tensor]]] = {
    Int4: _block, Int8: _block, W8A8: _w8a8, FP16: _fp16,
}


def format_qparams(fmt: Format, w: torch.Tensor, stats: LayerStats, method: str = "aware"
                  ) -> dict[str, torch.Tensor]:
    """Qparams of one ``(N, K)`` weight for one format, e.g. ``{"scale", "zero"[, "codes"]}``."""
    if method not in WEIGHT_METHODS:
        raise QuantcalError(f"unknown weight method {method!r}; use {', '.join(WEIGHT_METHODS)}")
    return _HANDLERS[type(fmt)](fmt, w, stats, method)


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


def _check_weight(w: torch.Tensor, layer: str) -> None:
    """A NaN/Inf weight gives finite but meaningless qparams, so it is refused first."""
    if not bool(torch.isfinite(w).all()):
        raise QuantcalError(f"the weights of layer {layer} hold NaN/Inf: the checkpoint is "
                            "damaged; re-download or re-export it")


def compute_qparams(weights_by_layer: dict[str, torch.Tensor], stats: dict[str, LayerStats],
                    formats: tuple[Format, ...], *, observer: str, method: str = "aware",
                    progress: bool = True) -> dict[str, torch.Tensor]:
    """Qparams of every layer for every format, keyed for ``qparams.safetensors``.

    Args:
        weights_by_layer: ``(N, K)`` weight per layer name (on the device to compute on).
    """
    from tqdm.auto import tqdm

    out: dict[str, torch.Tensor] = {}
    wants_act = any(isinstance(f, W8A8) for f in formats)
    for name in tqdm(weights_by_layer, desc="qparams", unit="layer", disable=not progress):
        w, s = weights_by_layer[name], stats[name]
        _check_weight(w, name)
        for fmt in formats:
            for key, t in format_qparams(fmt, w, s, method).items():
                out[f"{name}/{fmt.name}/{key}"] = _finite(t, name, fmt.name, key)
        if wants_act:
            for key, t in activation_qparams(s, observer).items():
                out[f"{name}/act/{key}"] = _finite(t, name, "w8a8", f"activation {key}")
    return out


def compute_embedding_qparams(tables: dict[str, torch.Tensor], formats: tuple[Format, ...], *,
                              method: str = "aware") -> dict[str, torch.Tensor]:
    """Qparams of each token embedding table for every block format, keyed like
    :func:`compute_qparams` (``w8a8`` and ``fp16`` do not apply: no activations feed it).

    The groups run along H, so a ``(V, H)`` table is quantized as a MatMulNBits weight of
    N=V, K=H would be (the layout a tied head shares). An embedding's output is one row of
    its table, so every element of a row counts alike: ``aware`` is the linear layers' clip
    search with a uniform weighting (each group's clip minimises its squared reconstruction
    error, which no calibration statistic could improve on); ``rtn`` rounds to nearest.

    Args:
        tables: ``(V, H)`` table per layer name (on the device to compute on).
    """
    if method not in WEIGHT_METHODS:
        raise QuantcalError(f"unknown weight method {method!r}; use {', '.join(WEIGHT_METHODS)}")
    out: dict[str, torch.Tensor] = {}
    for name, table in tables.items():
        _check_weight(table, name)
        uniform = torch.ones(table.shape[1], device=table.device)  # (H,)
        for fmt in formats:
            if isinstance(fmt, BlockQuant):
                scale, zero = _clip_qparams(fmt, table, uniform, method)
                out[f"{name}/{fmt.name}/scale"] = _finite(scale, name, fmt.name, "scale")
                out[f"{name}/{fmt.name}/zero"] = _finite(zero, name, fmt.name, "zero")
    return out
