"""Non-finite values are stopped where they enter: an activation overflow in the statistic
hooks names the first layer whose input is not finite (and the batch or block), qparams are
never NaN/Inf, and sensitivity scores that are not finite name the layer and format instead
of ending in a traceback or a silent NaN in a file."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from quantcal.calibrate.collect import collect_full, collect_sequential
from quantcal.calibrate.qparams import compute_qparams
from quantcal.calibrate.sensitivity import exact_sensitivity, output_fisher, proxy_sensitivity
from quantcal.calibrate.stats import LayerStats
from quantcal.cli import cli
from quantcal.errors import QuantcalError
from quantcal.formats import parse_formats
from quantcal.models import quantizable_layers, weight_matrix
from tinymodels import build_tiny_model

HUGE = "model.layers.0.mlp.up_proj"  # a finite but huge weight here ...
FIRST_BAD = "model.layers.0.mlp.down_proj"  # ... overflows this layer's input to inf


def _overflowing(model: torch.nn.Module, value: float = 1e38) -> torch.nn.Module:
    with torch.no_grad():
        model.get_submodule(HUGE).weight.fill_(value)
    return model


def _modules(model):
    return {n: model.get_submodule(n) for n, i in quantizable_layers(model).items()
            if i.kind != "embedding"}


def _windows(n: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 512, (n, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("collect", [collect_full, collect_sequential])
def test_activation_overflow_names_first_layer(collect):
    model = _overflowing(build_tiny_model("llama"))
    with pytest.raises(QuantcalError) as info:
        collect(model, _windows(), _modules(model), batch_size=2, device=torch.device("cpu"),
                progress=False)
    msg = str(info.value)
    assert FIRST_BAD in msg and "\n" not in msg
    assert HUGE + " " not in msg  # the huge layer's own input is fine
    assert ("batch 1 of 2" if collect is collect_full else "block 0") in msg


def test_clean_model_collects():
    model = build_tiny_model("llama")
    stats = collect_full(model, _windows(), _modules(model), batch_size=2,
                         device=torch.device("cpu"), progress=False)
    assert all(torch.isfinite(s.max).all() for s in stats.values())


def test_half_precision_overflow_suggests_float32():
    model = _overflowing(build_tiny_model("llama"), 6e4).half()  # finite in fp16
    with pytest.raises(QuantcalError) as info:
        collect_full(model, _windows(), _modules(model), batch_size=2,
                     device=torch.device("cpu"), progress=False)
    assert FIRST_BAD in str(info.value) and "--dtype float32" in str(info.value)


def _one_layer(w: torch.Tensor) -> tuple[dict, dict]:
    stats = LayerStats(w.shape[1], w.shape[0], "cpu")
    stats.update(torch.randn(32, w.shape[1]), torch.randn(32, w.shape[0]))
    return {"blk.proj": w}, {"blk.proj": stats}


@pytest.mark.parametrize("method", ["aware", "rtn"])
def test_qparams_refuse_non_finite_weights(method):
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    w[3, 5] = float("inf")  # aware_clip gives a finite but meaningless scale for this
    with pytest.raises(QuantcalError) as info:
        compute_qparams(*_one_layer(w), parse_formats("int4-g32"), observer="minmax",
                        method=method, progress=False)
    assert "blk.proj" in str(info.value) and "NaN/Inf" in str(info.value)


def test_qparams_scale_overflow_names_layer_and_format():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    w[3, 5], w[3, 6] = 3e38, -3e38  # finite, but the range (6e38) overflows float32
    with pytest.raises(QuantcalError) as info:
        compute_qparams(*_one_layer(w), parse_formats("int4-g32"), observer="minmax",
                        method="rtn", progress=False)
    assert "blk.proj" in str(info.value) and "int4-g32 scale" in str(info.value)


def _qparams(model, formats):
    modules = _modules(model)
    stats = collect_full(model, _windows(), modules, batch_size=2, device=torch.device("cpu"),
                         progress=False)
    weights = {n: weight_matrix(m).detach() for n, m in modules.items()}
    return compute_qparams(weights, stats, formats, observer="minmax", progress=False), stats


def test_fisher_on_overflowing_held_out_is_one_error():
    model = _overflowing(build_tiny_model("llama"))
    with pytest.raises(QuantcalError) as info:  # was: torch.multinomial RuntimeError
        output_fisher(model, _windows(), list(_modules(model)), batch_size=2,
                      device=torch.device("cpu"))
    assert "held-out batch 1" in str(info.value)


def test_exact_kl_not_finite_names_layer_and_format():
    model = build_tiny_model("llama")
    formats = parse_formats("int8,int4-g32")
    qparams, _ = _qparams(model, formats)
    bad = "model.layers.1.self_attn.o_proj"
    qparams[f"{bad}/int4-g32/scale"] = torch.full_like(qparams[f"{bad}/int4-g32/scale"],
                                                       float("nan"))
    layers = {n: i for n, i in quantizable_layers(model).items() if i.kind != "embedding"}
    with pytest.raises(QuantcalError) as info:
        exact_sensitivity(model, _windows(2), layers, formats, qparams, batch_size=2,
                          device=torch.device("cpu"), progress=False)
    assert bad in str(info.value) and "int4-g32" in str(info.value)


def test_proxy_not_finite_names_layer_and_format():
    model = build_tiny_model("llama")
    formats = parse_formats("int8")
    qparams, stats = _qparams(model, formats)
    modules = _modules(model)
    weights = {n: weight_matrix(m).detach() for n, m in modules.items()}
    fisher = {n: torch.ones(weights[n].shape[0]) for n in modules}
    fisher["lm_head"][0] = float("inf")
    with pytest.raises(QuantcalError) as info:
        proxy_sensitivity(weights, stats, formats, qparams, fisher)
    assert "lm_head" in str(info.value) and "int8" in str(info.value)


@pytest.mark.parametrize("extra", [["--no-sensitivity"], [], ["--sequential"]])
def test_calibrate_cli_activation_overflow(extra, tiny_llama_dir, tmp_path, c4_file):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors[HUGE + ".weight"] = torch.full_like(tensors[HUGE + ".weight"], 1e38)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    run = tmp_path / "run"
    argv = ["calibrate", "--model", str(folder), "--data", c4_file, "--samples", "4",
            "--seq-len", "32", "--batch-size", "2", "--sensitivity-samples", "2",
            "--run", str(run), *extra]
    res = CliRunner().invoke(cli, argv)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("quantcal: error")]
    assert len(lines) == 1 and FIRST_BAD in lines[0], res.output
    assert "Traceback" not in res.output
    assert not run.exists()
