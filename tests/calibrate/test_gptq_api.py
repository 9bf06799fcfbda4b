"""`quantcal calibrate --hessian [--act-order]` end to end: stats.safetensors holds no
Hessian, qparams.safetensors holds GPTQ codes for every block format of every linear layer
(which the fake-quant reference multiplies by), and the flags' misuse is one clear line."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from quantcal import qmath
from quantcal.cli import cli
from quantcal.fakequant import quantized_weight
from quantcal.formats import parse_format
from quantcal.models import load_model, weight_matrix
from quantcal.rundir import QPARAMS, STATS, RunDir


def _calibrate(model_dir, run, data, *extra):
    args = ["calibrate", "--model", str(model_dir), "--data", data, "--samples", "4",
            "--seq-len", "32", "--batch-size", "2", "--sensitivity-samples", "2",
            "--device", "cpu", "--run", str(run), *extra]
    return CliRunner().invoke(cli, args)


@pytest.mark.parametrize("extra", [["--act-order", "--sequential"], []],
                         ids=["act-order-sequential", "natural-full"])
def test_hessian_run_writes_codes_and_no_hessian(tiny_llama_dir, tmp_path, c4_file, extra):
    run = tmp_path / "run"
    res = _calibrate(tiny_llama_dir, run, c4_file, "--hessian", "--formats",
                     "int8,int4-g32,w8a8", *extra)
    assert res.exit_code == 0, res.output
    record = RunDir(run).read_run()
    assert record.config.hessian and record.config.act_order == ("--act-order" in extra)
    stats, _ = RunDir(run).load_tensors(STATS, "stats")
    assert not [k for k in stats if "xtx" in k]
    assert {t.dim() for t in stats.values()} <= {0, 1}  # no (K, K) matrix at all
    qparams, _ = RunDir(run).load_tensors(QPARAMS, "qparams")
    model, _ = load_model(str(tiny_llama_dir))
    linears = [n for n, i in record.layers.items() if i.kind != "embedding"]
    for name in linears:
        w = weight_matrix(model.get_submodule(name)).detach()
        for fmt_name in ("int8", "int4-g32"):
            fmt = parse_format(fmt_name)
            qp = {k: qparams[f"{name}/{fmt_name}/{k}"] for k in ("scale", "zero", "codes")}
            assert qp["codes"].shape == w.shape and qp["codes"].dtype == torch.uint8
            plain = qmath.quantize_weight(w, qp["scale"], qp["zero"], fmt.bits, fmt.group_size)
            assert not torch.equal(qp["codes"], plain)  # GPTQ's, not nearest rounding
            torch.testing.assert_close(  # what sensitivity, plan and export multiply by
                quantized_weight(fmt, w, qp),
                qmath.dequantize_weight(qp["codes"], qp["scale"], qp["zero"], fmt.group_size))
        assert f"{name}/w8a8/scale" in qparams and f"{name}/w8a8/codes" not in qparams
    assert RunDir(run).has("plan.json")


@pytest.mark.parametrize("flags, words", [
    (["--act-order"], ["--act-order", "--hessian"]),
    (["--hessian", "--formats", "w8a8,fp16"], ["--hessian", "--formats"]),
])
def test_misuse_is_one_clear_line(tiny_llama_dir, tmp_path, c4_file, flags, words):
    run = tmp_path / "run"
    res = _calibrate(tiny_llama_dir, run, c4_file, *flags)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("quantcal: error: "), res.output
    assert all(w in lines[0] for w in words), lines[0]
    assert not run.exists()
