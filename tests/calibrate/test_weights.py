"""Weight quantizers: calibrated qparams beat round-to-nearest on real text; GPTQ beats
clipping on the data it saw; qparams exist for every format. (GPTQ against a reference and
the block-by-block driver: test_gptq*.py.)"""

from __future__ import annotations

import pytest
import torch

from tinymodels import build_tiny_model
from quantcal import qmath
from quantcal.calibrate import weights
from quantcal.calibrate.collect import collect_full
from quantcal.calibrate.data import calibration_windows
from quantcal.calibrate.qparams import compute_qparams
from quantcal.fakequant import layer_qparams
from quantcal.formats import W8A8, Int4, Int8
from quantcal.models import quantizable_layers, weight_matrix


class _InputStore:
    def __init__(self, modules):
        self.x = {n: [] for n in modules}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name):
        return lambda _m, inp, _out: self.x[name].append(inp[0].detach().reshape(
            -1, inp[0].shape[-1]))

    def close(self):
        for h in self.handles:
            h.remove()
        return {n: torch.cat(v) for n, v in self.x.items()}


@pytest.fixture(scope="module")
def calibrated(c4_texts, tiny_tokenizer):
    """A tiny Llama, stats on 16 C4 windows, and activations of 8 held-out windows."""
    model = build_tiny_model("llama")
    calib, held = calibration_windows(c4_texts[:200], tiny_tokenizer, seq_len=64, samples=16,
                                      seed=0, holdout=8)
    layers = quantizable_layers(model)
    modules = {n: model.get_submodule(n) for n, i in layers.items() if i.kind != "embedding"}
    stats = collect_full(model, calib, modules, batch_size=8, device=torch.device("cpu"),
                         hessian=True, progress=False)
    store = _InputStore(modules)
    with torch.no_grad():
        model(held, use_cache=False)
    return modules, stats, store.close()


# at 8 bits the min/max range is close to optimal for these random weights, so the gain is
# small (about 0.5%); at 4 bits clipping buys much more
@pytest.mark.parametrize("fmt, margin, min_wins", [
    (Int4(128), 0.95, 0.8), (Int4(32), 0.95, 0.8), (Int4(64, symmetric=True), 0.95, 0.8),
    (Int8(), 1.0, 0.5),
])
def test_calibrated_weights_beat_rtn_on_held_out_text(calibrated, fmt, margin, min_wins):
    modules, stats, held_x = calibrated
    total_rtn = total_cal = 0.0
    wins = 0
    for name, module in modules.items():
        w = weight_matrix(module).detach()
        w_rtn = qmath.rtn_weight(w, fmt.bits, fmt.group_size, fmt.symmetric)
        s, z = weights.aware_clip(w, stats[name].mean_sq, fmt.bits, fmt.group_size,
                                  fmt.symmetric)
        w_cal = qmath.fake_quant_weight(w, s, z, fmt.bits, fmt.group_size)
        e_rtn = weights.output_error(w, w_rtn, held_x[name])
        e_cal = weights.output_error(w, w_cal, held_x[name])
        total_rtn += e_rtn
        total_cal += e_cal
        wins += e_cal < e_rtn
    assert total_cal < margin * total_rtn, (total_cal, total_rtn)
    assert wins >= min_wins * len(modules)


def test_gptq_beats_clipping_on_calibration_data(calibrated):
    modules, stats, _ = calibrated
    fmt = Int4(32)
    name = "model.layers.0.mlp.down_proj"
    w = weight_matrix(modules[name]).detach()
    s, z = weights.aware_clip(w, stats[name].mean_sq, 4, 32, False)
    factor = weights.gptq_factor(stats[name].xtx / stats[name].tokens)
    gs, gz, codes = weights.gptq(w, factor, 4, 32, False)
    w_gptq = qmath.dequantize_weight(codes, gs, gz, 32)
    w_clip = qmath.fake_quant_weight(w, s, z, fmt.bits, 32)

    def hessian_error(w_hat):  # tr(dW H dW^T): the output error on the calibration tokens
        d = (w - w_hat).double()
        return float(torch.einsum("nk,kl,nl->", d, stats[name].xtx.double(), d))

    assert hessian_error(w_gptq) < 0.9 * hessian_error(w_clip)


def test_compute_qparams_covers_every_format(calibrated):
    modules, stats, _ = calibrated
    formats = (Int8(), Int4(128), W8A8())
    ws = {n: weight_matrix(m).detach() for n, m in list(modules.items())[:3]}
    q = compute_qparams(ws, stats, formats, observer="mse", progress=False)
    for name, w in ws.items():
        n, k = w.shape
        p4 = layer_qparams(q, name, Int4(128))
        assert p4["scale"].shape == (n, -(-k // 128)) and "codes" in p4  # hessian was on
        assert layer_qparams(q, name, W8A8())["scale"].shape == (n, 1)
        assert q[f"{name}/act/scale"].shape == () and float(q[f"{name}/act/scale"]) > 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("symmetric", [False, True])
def test_aware_clip_falls_back_to_min_max_when_no_error_is_finite(bad, symmetric):
    """Every candidate's weighted error is NaN/inf: the result is plain min/max qparams
    (the r = 1 candidate, numpy's amin/amax here), never uninitialised memory."""
    w = torch.randn(300, 96, generator=torch.Generator().manual_seed(0))
    h_diag = torch.full((96,), bad)
    s, z = weights.aware_clip(w, h_diag, 4, 64, symmetric)
    wg = torch.nn.functional.pad(w, (0, 32)).reshape(300, 2, 64).numpy()
    lo = torch.from_numpy(wg.min(-1)).clamp(max=0)
    hi = torch.from_numpy(wg.max(-1)).clamp(min=0)
    if symmetric:
        ref_s, ref_z = torch.maximum(-lo, hi) / 7, torch.full_like(lo, 8.0)
    else:
        ref_s = (hi - lo) / 15
        ref_z = torch.round(-lo / ref_s)
    torch.testing.assert_close(s, ref_s)
    torch.testing.assert_close(z, ref_z)
