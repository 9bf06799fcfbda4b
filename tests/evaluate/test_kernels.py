"""`quantcal bench kernels` on the CPU provider: the one-node graphs compute what they say
(against numpy's dequantization), the bench fills a table with every (format, layout, shape,
M), the fitted model recovers known coefficients, the command writes and prints the table."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from quantcal.cli import cli
from quantcal.errors import QuantcalError
from quantcal.evaluate.kernelgraphs import Shape, kernel_model
from quantcal.evaluate.kernels import (
    bench_kernels, fit_model, format_kernels, model_shapes_of, parse_shape,
)
from quantcal.latency import KernelEntry, LatencyModel, load_table


def _run(model: bytes, a: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, {"A": a})


def _reference(model: bytes, a: np.ndarray) -> list[np.ndarray]:
    """A @ W^T with W dequantized here from the node's initializers: codes low bits first
    along K, (code - zero point) x scale per block, zero point 2^(bits-1) when absent."""
    proto = onnx.load_from_string(model)
    init = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    outs = []
    for i, node in enumerate(proto.graph.node):
        if node.op_type == "MatMul":
            outs.append(a @ init[f"W{i}"].astype(np.float64))
            continue
        attrs = {x.name: x.i for x in node.attribute}
        bits, block, n, k = attrs["bits"], attrs["block_size"], attrs["N"], attrs["K"]
        raw = init[f"B{i}"].reshape(n, -1)
        codes = (np.stack([raw & 15, raw >> 4], -1).reshape(n, -1) if bits == 4 else raw)
        blocks = codes.shape[1] // block
        zp = init.get(f"zero_points{i}")
        if zp is None:
            zeros = np.full((n, blocks), 2 ** (bits - 1))
        elif bits == 4:
            zeros = np.stack([zp & 15, zp >> 4], -1).reshape(n, -1)[:, :blocks]
        else:
            zeros = zp[:, :blocks]
        w = ((codes.reshape(n, blocks, block).astype(np.float64) - zeros[..., None])
             * init[f"scales{i}"].astype(np.float64)[..., None]).reshape(n, -1)[:, :k]
        outs.append(a @ w.T)
    return outs


@pytest.mark.parametrize("fmt, layout", [("int4-g16", "plain"), ("int4-g32-sym", "plain"),
                                         ("int8-g32", "plain"), ("int8-sym", "plain"),
                                         ("fp16", "matmul")])
@pytest.mark.parametrize("fused", [False, True])
def test_graphs_compute_the_dequantized_product(fmt, layout, fused):
    shape = Shape((48, 16, 16), 96, fused)  # K=96: int8's block of 128 pads it
    model = kernel_model(fmt, layout, shape, np.float32, seed=3)
    a = np.random.default_rng(0).standard_normal((5, 96)).astype(np.float32)
    got, want = _run(model, a), _reference(model, a)
    assert [g.shape for g in got] == [(5, n) for n in shape.outputs]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())


def test_kernel_model_refuses_layouts_a_format_has_not():
    with pytest.raises(QuantcalError, match="fp16 has no plain layout"):
        kernel_model("fp16", "plain", Shape((16,), 32), np.float32)
    with pytest.raises(QuantcalError, match="int8 has no matmul layout"):
        kernel_model("int8", "matmul", Shape((16,), 32), np.float32)


def test_shapes():
    shapes = {(s.parts, s.k, s.fused) for s in model_shapes_of("llama-3.1-8b")}
    assert {((4096,), 4096, False), ((1024,), 4096, False), ((14336,), 4096, False),
            ((4096,), 14336, False), ((4096, 1024, 1024), 4096, True),
            ((4096, 1024, 1024), 4096, False), ((14336, 14336), 4096, True),
            ((14336, 14336), 4096, False)} == shapes
    assert [(s.parts, s.fused) for s in parse_shape("64+32x128")] == [((64, 32), False),
                                                                     ((64, 32), True)]
    with pytest.raises(QuantcalError, match="write NxK"):
        parse_shape("64*128")


def test_bench_fills_every_entry_on_cpu():
    shapes = parse_shape("32x64") + parse_shape("32+16+16x64")
    formats = ["fp16", "int4-g16", "int4-g64-sym", "int8"]
    table = bench_kernels(shapes, formats, [1, 3], provider="cpu", repeats=2, inner=2)
    keys = {(e.format, e.layout, tuple(e.parts), e.k, e.m, e.fused) for e in table.entries}
    want = {(f, "matmul" if f == "fp16" else "plain", s.parts, 64, m, s.fused)
            for f in formats for s in shapes for m in (1, 3)}
    assert keys == want and not table.unsupported
    assert table.provider == "cpu" and table.activation_dtype == "float32"
    assert table.onnxruntime == ort.__version__
    assert all(e.median_us > 0 and e.repeats == 4 and not e.cuda_graph for e in table.entries)
    text = format_kernels(table)
    assert len([line for line in text.splitlines() if line.startswith("int4-g16 ")]) == 3


def test_fitted_model_recovers_known_coefficients():
    """Entries made from 2 us per run, 3 us per node, 500 GB/s (MatMulNBits) and 800 GB/s
    (MatMul): the fit returns the last three."""
    entries = []
    for fmt, gbs in (("int4-g32", 500.0), ("int8", 500.0), ("fp16", 800.0)):
        bpw = {"int4-g32": 0.5 + 2 / 32 + 0.5 / 32, "int8": 1 + 2 / 128 + 1 / 128,
               "fp16": 2.0}[fmt]
        for parts, fused in (((4096,), False), ((1024,), False), ((4096, 1024), False),
                             ((4096, 1024), True)):
            nodes = 1 if fused else len(parts)
            nbytes = sum(parts) * 4096 * bpw
            entries.append(KernelEntry(fmt, "matmul" if fmt == "fp16" else "plain",
                                       list(parts), 4096, 1, fused,
                                       2.0 + 3.0 * nodes + nbytes / (gbs * 1e3)))
    fallback = LatencyModel({"matmulnbits": 1.0, "matmul": 1.0}, 0.0)
    model = fit_model(entries, fallback)
    assert model.node_us == pytest.approx(3.0, rel=1e-6)
    assert model.bandwidth_gb_s["matmulnbits"] == pytest.approx(500.0, rel=1e-6)
    assert model.bandwidth_gb_s["matmul"] == pytest.approx(800.0, rel=1e-6)
    assert fit_model(entries[:2], fallback).source.startswith("the shipped table's model")


def test_command_writes_and_prints_the_table(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    args = ["bench", "kernels", "--kernel-shape", "32+16x64", "--kernel-formats",
            "fp16,int4-g16-sym", "--m", "1,2", "--repeats", "2", "--provider", "cpu"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    (path,) = (tmp_path / "cache" / "quantcal").glob("kernels-*-ort*.json")
    assert f"wrote {path}" in res.stderr
    table = load_table(path)
    assert len(table.entries) == 2 * 2 * 2  # formats x (separate, fused) x M
    assert "int4-g16-sym   plain" in res.stdout and "M=2" in res.stdout
    out = tmp_path / "t.json"
    res = CliRunner().invoke(cli, args + ["--json", "-o", str(out)])
    assert res.exit_code == 0 and json.loads(res.stdout)["entries"] and out.exists()
    for bad, words in ((["--kernel-shape", "64"], "write NxK"),
                       (["--kernel-formats", "int4-g24"], "unknown kernel format"),
                       (["--m", "1,x"], "whole numbers"), (["--layouts", "tiled"],
                                                           "unknown layout")):
        res = CliRunner().invoke(cli, ["bench", "kernels", "--provider", "cpu", *bad])
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and words in lines[0], res.output


def test_a_refused_kernel_is_recorded_not_fatal(monkeypatch):
    """onnxruntime refusing a (format, layout) on its smallest shape: the reason is kept,
    the larger shapes are not tried, the other formats are timed."""
    import quantcal.evaluate.kernels as kernels

    real, seen = kernels._session, []

    def session(model, provider, layout, cuda_graph):
        proto = onnx.load_from_string(model)
        seen.append((proto.graph.node[0].op_type, proto.graph.input[0].type.tensor_type
                     .shape.dim[1].dim_value))
        if proto.graph.node[0].op_type == "MatMulNBits":
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : not for this kernel")
        return real(model, provider, layout, cuda_graph)

    monkeypatch.setattr(kernels, "_session", session)
    shapes = parse_shape("32x128") + parse_shape("16x64")
    table = bench_kernels(shapes, ["fp16", "int8"], [1], provider="cpu", repeats=1, inner=1)
    assert {(e.format, e.parts[0]) for e in table.entries} == {("fp16", 32), ("fp16", 16)}
    assert table.unsupported == {"int8 plain": "not for this kernel (on 16x64; no other "
                                               "shape tried)"}
    assert seen.count(("MatMulNBits", 64)) == 1 and ("MatMulNBits", 128) not in seen
