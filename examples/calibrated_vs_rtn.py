"""Does calibration beat round-to-nearest? Per-layer output error on held-out text.

    python examples/calibrated_vs_rtn.py --run RUN_DIR [--windows 4] [--formats int4-g128,int8]

Reads a calibrated run directory (its model, qparams and data spec), draws held-out windows
(another seed), and for every linear layer measures ||x W^T - x W_hat^T||^2 with W_hat from
the run's calibrated qparams and from plain RTN, accumulated over the windows by hooks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from quantcal import qmath
from quantcal.calibrate.data import load_calibration_data
from quantcal.calibrate.qparams import QPARAMS_KIND
from quantcal.fakequant import layer_qparams
from quantcal.formats import parse_formats
from quantcal.models import load_model, weight_matrix
from quantcal.rundir import QPARAMS, RunDir


def quantized_weights(w: torch.Tensor, qp: dict, fmt) -> tuple[torch.Tensor, torch.Tensor]:
    g = getattr(fmt, "group_size", None)
    if "codes" in qp:
        cal = qmath.dequantize_weight(qp["codes"], qp["scale"], qp["zero"], g)
    else:
        cal = qmath.fake_quant_weight(w, qp["scale"], qp["zero"], fmt.bits, g)
    return cal, qmath.rtn_weight(w, fmt.bits, g, fmt.symmetric)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--formats", default="int4-g128,int4-g64,int8")
    args = ap.parse_args()

    run = RunDir(args.run)
    cfg = run.read_run().config
    qparams, _ = run.load_tensors(QPARAMS, QPARAMS_KIND)
    model, tok = load_model(cfg.model)
    _, held = load_calibration_data(cfg.data, tok, seq_len=cfg.seq_len, samples=cfg.samples,
                                    seed=cfg.seed, holdout=args.windows,
                                    text_field=cfg.text_field)
    formats = [f for f in parse_formats(args.formats) if f in cfg.formats]
    layers = {n for n, i in run.read_run().layers.items() if i.kind != "embedding"}
    deltas = {}  # (layer, fmt) -> (dW_cal, dW_rtn)
    for name in layers:
        w = weight_matrix(model.get_submodule(name)).detach().float()
        for fmt in formats:
            cal, rtn = quantized_weights(w, layer_qparams(qparams, name, fmt), fmt)
            deltas[name, fmt.name] = (w - cal, w - rtn)
    err = {k: [0.0, 0.0] for k in deltas}

    def hook(name):
        def fn(_m, inputs, _out):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            for fmt in formats:
                d_cal, d_rtn = deltas[name, fmt.name]
                err[name, fmt.name][0] += float((x @ d_cal.T).square().sum())
                err[name, fmt.name][1] += float((x @ d_rtn.T).square().sum())
        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in layers]
    with torch.no_grad():
        for window in held.split(1):
            model(window, use_cache=False)
    for h in handles:
        h.remove()
    print(f"{len(layers)} layers, {held.numel()} held-out tokens from {cfg.data}")
    print(f"{'format':12} {'calibrated':>12} {'RTN':>12} {'ratio':>7} {'layers better':>14}")
    for fmt in formats:
        cal = sum(err[n, fmt.name][0] for n in layers)
        rtn = sum(err[n, fmt.name][1] for n in layers)
        wins = sum(err[n, fmt.name][0] < err[n, fmt.name][1] for n in layers)
        print(f"{fmt.name:12} {cal:12.4g} {rtn:12.4g} {cal / rtn:7.3f} {wins:>8}/{len(layers)}")


if __name__ == "__main__":
    main()
