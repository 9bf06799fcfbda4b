"""Every op the export emits, on onnxruntime's CUDA provider against its CPU provider and
torch fake-quant of the same weights: MatMulNBits (4 and 8 bits, symmetric and asymmetric,
every group size quantcal uses, K a multiple of the block or not, M = 1 and 16, fp32 and fp16
activations), GatherBlockQuantized (int4/int8 tables, alone and in the tied-head layout),
QDQ (w8a8) and the fp16 MatMul. Graphs come from quantcal's own emitters, so the test covers
what export writes; sessions come from :func:`quantcal.session.make_session`, whose CUDA
session refuses to fall back to CPU for any node.

The same cases run on the CPU provider alone in every test run (``test_*_cpu``); the
``gpu``-marked tests add the CUDA provider. Writes only into pytest's tmp_path.

Tolerances are worst-case rounding bounds, not fitted numbers. With ``u`` the unit roundoff
of the arithmetic (2**-24 for fp32 on CPU; 2**-11 for fp16, and for fp32 on CUDA, whose
GEMMs use TF32's fp16-sized mantissa), ``S = |x| @ |w_hat|^T`` and ``D = |x| @ ((q+z)*s)^T``:

    |y - ref| <= 2u*D + g(L+1, u)*S + g(K, 2**-24)*S + u*|ref|,   g(n, u) = n*u / (1 - n*u)

2u*D: the kernel dequantizes as ``q*s - z*s`` (two roundings, each relative to ``(q+z)*s``);
g(L+1, u)*S: a product and chains of L additions at precision u (the CUDA fp16 GEMV keeps
half-precision partial sums over every 256th element of K, so L = ceil(K/256); fp32 CPU adds
in fp32, L = 0; TF32 rounds both factors, L = 1); g(K, 2**-24)*S: the rest of the K-term sum
in fp32; u*|ref|: the output's rounding. GatherBlockQuantized is one correctly rounded
product ``(q - z) * s`` and must equal torch's bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch

from quantcal import qmath
from quantcal.export.builder import GraphBuilder, save_model
from quantcal.export.emit import (
    block_initializers, emit_embedding, emit_linear, gather_shared, matmulnbits, pack_block,
)
from quantcal.fakequant import quantized_weight
from quantcal.formats import (
    FP16, INT4_GROUP_SIZES, INT8_GROUP_SIZES, W8A8, BlockQuant, Format, Int4, Int8,
    shares_tied_weight,
)
from quantcal.session import make_session

U32, U16 = 2.0**-24, 2.0**-11
LAYER, EMB = "model.layers.0.mlp.down_proj", "model.embed_tokens"
BLOCK_FORMATS = ([Int4(g, s) for g in INT4_GROUP_SIZES for s in (False, True)]
                 + [Int8(g, s) for g in INT8_GROUP_SIZES for s in (False, True)])
SHAPES = [(96, 576), (104, 1024)]  # (N, K): 576 = 4.5 blocks of 128, 2.25 of 256
TABLES = [(64, 576), (48, 512)]  # (V, H): 576 pads to whole (and, asymmetric int4, even) blocks
IDS = np.array([[0, 5, 5], [47, 2, 30]], np.int64)  # (B, S): repeats, first and last row
DTYPES = {"fp32": np.float32, "fp16": np.float16}


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    """``(N, K)`` with an outlier input channel, fp16-representable (an fp16 MatMul stores
    it exactly)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[:, 7] *= 8.0
    return w.half().float()


def _activations(m: int, k: int, seed: int) -> torch.Tensor:
    """``(1, M, K)``, fp16-representable, with an outlier channel."""
    x = torch.randn(1, m, k, generator=torch.Generator().manual_seed(seed))
    x[..., 3] *= 6.0
    return x.half().float()


def qparams(fmt: Format, w: torch.Tensor, x: torch.Tensor, dtype
            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Min/max weight qparams (and w8a8's static activation qparams) with scales rounded to
    ``dtype``, as the graph stores them, so that the reference sees the same scales."""
    def stored(qp):
        return {**qp, "scale": torch.from_numpy(qp["scale"].numpy().astype(dtype)).float()}
    if isinstance(fmt, FP16):
        return {}, None
    if isinstance(fmt, W8A8):
        scale, zero = qmath.weight_qparams(w, 8, None, symmetric=True)  # (N, 1)
        a_scale, a_zero = qmath.range_qparams(x.min(), x.max(), 8, symmetric=False)  # ()
        return stored({"scale": scale, "zero": zero}), stored({"scale": a_scale, "zero": a_zero})
    scale, zero = qmath.weight_qparams(w, fmt.bits, fmt.group_size, fmt.symmetric)  # (N, G)
    return stored({"scale": scale, "zero": zero}), None


def linear_graph(fmt: Format, w: torch.Tensor, qp, act_qp, dtype) -> onnx.ModelProto:
    """One layer ``y = x @ w_hat^T`` as :func:`emit_linear` writes it; x is ``(1, M, K)``."""
    n, k = w.shape
    b = GraphBuilder(dtype)
    x = b.input("x", b.elem_type, [1, "M", k])
    b.output(emit_linear(b, LAYER, x, w, None, fmt, qp, act_qp), b.elem_type, [1, "M", n])
    return b.model()


def _gamma(n: int, u: float) -> float:
    return n * u / (1 - n * u)


def _precision(provider: str, dtype, k: int) -> tuple[float, int]:
    """``(u, L)`` of the module docstring for a provider and activation dtype."""
    if np.dtype(dtype) == np.float16:
        return U16, math.ceil(k / 256)
    return (U16, 1) if provider == "cuda" else (U32, 0)


def linear_reference(fmt: Format, w: torch.Tensor, qp, act_qp, x: torch.Tensor, dtype,
                     provider: str) -> tuple[np.ndarray, np.ndarray]:
    """torch's ``(1, M, N)`` output in float64 and the docstring's bound for ``provider``."""
    k = w.shape[1]
    u, chain = _precision(provider, dtype, k)
    x = x.double()
    w_hat = quantized_weight(fmt, w, qp).double()  # (N, K): the fake-quant weight
    extra = torch.zeros(())
    if isinstance(fmt, BlockQuant):
        q = qmath.quantize_weight(w, qp["scale"], qp["zero"], fmt.bits, fmt.group_size)
        spread = qmath.dequantize_weight(q, qp["scale"], -qp["zero"], fmt.group_size)  # (q+z)*s
        dq = x.abs() @ spread.double().T
    else:
        if isinstance(fmt, W8A8):  # activations fake-quantized with the static scale
            s, z = act_qp["scale"].double(), act_qp["zero"].double()
            r = x / s
            # a code may round either way where x/s is within rounding error of a tie
            tie = (r - r.floor() - 0.5).abs() <= 4 * u * r.abs()
            extra = s * (tie.double() @ w_hat.abs().T)
            x = (torch.round(r) + z).clamp(0, 255).sub(z).mul(s)
        # fp16: the weight is stored exactly; w8a8: x and w are each dequantized (one rounding)
        dq = torch.zeros(()) if isinstance(fmt, FP16) else x.abs() @ w_hat.abs().T
    ref = x @ w_hat.T
    mag = x.abs() @ w_hat.abs().T
    first = 2 * u * dq + (_gamma(chain + 1, u) + _gamma(k, U32)) * mag + extra
    return ref.numpy(), (first + u * (ref.abs() + first)).numpy()


def run_graph(model: onnx.ModelProto, feeds: dict, provider: str, path) -> list[np.ndarray]:
    """Run ``model`` (saved to ``path``) on ``provider`` alone, as quantcal opens models."""
    if not path.exists():
        save_model(model, path)
    sess, used = make_session(path, provider)
    assert used == provider, f"{provider} session could not be made; it ran on {used}"
    return sess.run(None, feeds)


def _within(name: str, got: np.ndarray, ref: np.ndarray, tol: np.ndarray) -> None:
    err = np.abs(got.astype(np.float64) - ref)
    assert np.isfinite(got).all(), f"{name}: non-finite output"
    worst = np.unravel_index(np.argmax(err - tol), err.shape)
    assert np.all(err <= tol), (f"{name}: |error| {err[worst]:.3g} > bound {tol[worst]:.3g} "
                                f"at {worst} (max error {err.max():.3g})")


def check_linear(fmt: Format, n: int, k: int, m: int, dtype, providers, tmp_path) -> None:
    """Each provider against torch within its bound; two providers against each other within
    the sum of their bounds."""
    w, x = _weight(n, k, seed=n + k), _activations(m, k, seed=m)
    qp, act_qp = qparams(fmt, w, x, dtype)
    model = linear_graph(fmt, w, qp, act_qp, dtype)
    onnx.checker.check_model(model)
    outs, tols = {}, {}
    for p in providers:
        (outs[p],) = run_graph(model, {"x": x.numpy().astype(dtype)}, p, tmp_path / "m.onnx")
        assert outs[p].dtype == dtype and outs[p].shape == (1, m, n)
        ref, tols[p] = linear_reference(fmt, w, qp, act_qp, x, dtype, p)
        _within(f"{p} vs torch", outs[p], ref, tols[p])
    if len(providers) == 2:
        a, b = providers
        _within(f"{b} vs {a}", outs[b], outs[a].astype(np.float64), tols[a] + tols[b])


def _table(v: int, h: int) -> torch.Tensor:
    t = torch.randn(v, h, generator=torch.Generator().manual_seed(v + h)) * 0.05
    t[:, 11] *= 8.0
    return t


def _rows_reference(fmt: BlockQuant, table: torch.Tensor, qp, dtype) -> np.ndarray:
    """torch's rows: ``(q - z) * s`` in fp32 (exact for fp16 scales), rounded once to dtype."""
    return quantized_weight(fmt, table, qp)[torch.from_numpy(IDS)].numpy().astype(dtype)


def _assert_explicit_zero_points(model: onnx.ModelProto) -> None:
    """Symmetric tables too: the kernels' defaults for a missing input have differed."""
    (node,) = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(node.input) == 4 and node.input[3], "GatherBlockQuantized without zero points"


def check_embedding(fmt: BlockQuant, v: int, h: int, dtype, providers, tmp_path) -> None:
    """:func:`emit_embedding`'s rows equal torch's on every provider, bit for bit."""
    table = _table(v, h)
    qp, _ = qparams(fmt, table, table, dtype)
    b = GraphBuilder(dtype)
    ids = b.input("ids", onnx.TensorProto.INT64, ["B", "S"])
    b.output(emit_embedding(b, EMB, ids, table, fmt, qp), b.elem_type, ["B", "S", h])
    model = b.model()
    onnx.checker.check_model(model)
    _assert_explicit_zero_points(model)
    ref = _rows_reference(fmt, table, qp, dtype)
    for p in providers:
        (rows,) = run_graph(model, {"ids": IDS}, p, tmp_path / "e.onnx")
        assert rows.dtype == dtype and rows.shape == (*IDS.shape, h)
        np.testing.assert_array_equal(rows, ref, err_msg=f"{fmt.name} rows on {p}")


def check_tied(fmt: BlockQuant, dtype, providers, tmp_path) -> None:
    """The tied-head layout (:func:`gather_shared` reads the head's MatMulNBits initializers):
    rows bit for bit, the head's logits within the MatMulNBits bound."""
    v, h = TABLES[1]
    assert shares_tied_weight(fmt, fmt, h)
    table, x = _table(v, h), _activations(4, h, seed=9)
    qp, _ = qparams(fmt, table, x, dtype)
    b = GraphBuilder(dtype)
    ids = b.input("ids", onnx.TensorProto.INT64, ["B", "S"])
    xs = b.input("x", b.elem_type, [1, "M", h])
    packed = pack_block(EMB, fmt, table, qp)
    weight = block_initializers(b, EMB, packed)
    b.output(gather_shared(b, EMB, ids, weight, packed, fmt), b.elem_type, ["B", "S", h])
    b.output(matmulnbits(b, "lm_head", xs, weight, packed), b.elem_type, [1, "M", v])
    model = b.model()
    onnx.checker.check_model(model)
    _assert_explicit_zero_points(model)
    ref = _rows_reference(fmt, table, qp, dtype)
    for p in providers:
        rows, logits = run_graph(model, {"ids": IDS, "x": x.numpy().astype(dtype)}, p,
                                 tmp_path / "t.onnx")
        np.testing.assert_array_equal(rows, ref, err_msg=f"{fmt.name} tied rows on {p}")
        _within(f"{p} tied head", logits, *linear_reference(fmt, table, qp, None, x, dtype, p))


LINEAR_CASES = [pytest.param(fmt, n, k, m, d, id=f"{fmt.name}-{n}x{k}-m{m}-{d}")
                for fmt in [*BLOCK_FORMATS, FP16(), W8A8()] for n, k in SHAPES
                for m in (1, 16) for d in DTYPES]
EMBEDDING_CASES = [pytest.param(fmt, v, h, d, id=f"{fmt.name}-{v}x{h}-{d}")
                   for fmt in BLOCK_FORMATS for v, h in TABLES for d in DTYPES]
TIED_CASES = [pytest.param(fmt, d, id=f"{fmt.name}-{d}") for fmt in BLOCK_FORMATS
              for d in DTYPES]


@pytest.mark.parametrize("fmt, n, k, m, dtype", LINEAR_CASES)
def test_linear_cpu(fmt, n, k, m, dtype, tmp_path) -> None:
    check_linear(fmt, n, k, m, DTYPES[dtype], ("cpu",), tmp_path)


@pytest.mark.parametrize("fmt, v, h, dtype", EMBEDDING_CASES)
def test_embedding_cpu(fmt, v, h, dtype, tmp_path) -> None:
    check_embedding(fmt, v, h, DTYPES[dtype], ("cpu",), tmp_path)


@pytest.mark.parametrize("fmt, dtype", TIED_CASES)
def test_tied_cpu(fmt, dtype, tmp_path) -> None:
    check_tied(fmt, DTYPES[dtype], ("cpu",), tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt, n, k, m, dtype", LINEAR_CASES)
def test_linear_cuda(fmt, n, k, m, dtype, tmp_path) -> None:
    check_linear(fmt, n, k, m, DTYPES[dtype], ("cpu", "cuda"), tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt, v, h, dtype", EMBEDDING_CASES)
def test_embedding_cuda(fmt, v, h, dtype, tmp_path) -> None:
    check_embedding(fmt, v, h, DTYPES[dtype], ("cpu", "cuda"), tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt, dtype", TIED_CASES)
def test_tied_cuda(fmt, dtype, tmp_path) -> None:
    check_tied(fmt, DTYPES[dtype], ("cpu", "cuda"), tmp_path)
