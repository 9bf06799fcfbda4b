"""MatMulNBits packing: bit-level round trips, and parity of a one-node onnxruntime graph
(CPU provider) against the torch dequantize reference for every bits/group/symmetry."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from quantcal.packing import (
    dequantize_matmulnbits, pack_codes, pack_matmulnbits, unpack_codes, unpack_matmulnbits,
)
from quantcal.qmath import dequantize_weight, quantize_weight, weight_qparams


@given(bits=st.sampled_from([2, 4, 8]), rows=st.integers(1, 4), length=st.integers(1, 12),
       seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_pack_codes_round_trip(bits, rows, length, seed):
    per_byte = 8 // bits
    length *= per_byte
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (rows, length), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_codes(q, bits)
    assert packed.shape == (rows, length * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, length), q)


def test_pack_codes_low_nibble_first():
    q = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    assert pack_codes(q, 4).tolist() == [[0x21, 0x43]]


def _quantized(n, k, bits, block, symmetric, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    scale, zero = weight_qparams(w, bits, block, symmetric)
    q = quantize_weight(w, scale, zero, bits, block)
    return w, q, scale, zero


@pytest.mark.parametrize("k", [128, 200])  # 200: K not a multiple of the block
@pytest.mark.parametrize("symmetric", [False, True])
def test_pack_matmulnbits_round_trip(k, symmetric):
    for bits in (4, 8):
        for block in (32, 64, 128):
            _, q, scale, zero = _quantized(24, k, bits, block, symmetric)
            packed = pack_matmulnbits(q, scale, None if symmetric else zero, bits, block)
            assert packed.B.shape == (24, -(-k // block), block * bits // 8)
            q2, s2, z2 = unpack_matmulnbits(packed)
            assert torch.equal(q2, q)
            assert torch.equal(s2, scale)
            assert torch.equal(z2, zero)
            ref = dequantize_weight(q, scale, zero, block)
            assert torch.equal(dequantize_matmulnbits(packed), ref)


def _matmulnbits_model(packed, m_dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    inits = [
        numpy_helper.from_array(packed.B.numpy(), "B"),
        numpy_helper.from_array(packed.scales.numpy(), "scales"),
    ]
    inputs = ["A", "B", "scales"]
    if packed.zero_points is not None:
        inits.append(numpy_helper.from_array(packed.zero_points.numpy(), "zero_points"))
        inputs.append("zero_points")
    node = helper.make_node(
        "MatMulNBits", inputs, ["Y"], domain="com.microsoft", name="/parity/MatMulNBits",
        K=packed.K, N=packed.N, bits=packed.bits, block_size=packed.block_size,
        accuracy_level=0,
    )
    graph = helper.make_graph(
        [node], "parity",
        [helper.make_tensor_value_info("A", m_dtype, ["M", packed.K])],
        [helper.make_tensor_value_info("Y", m_dtype, ["M", packed.N])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("k", [256, 200])
def test_matmulnbits_onnxruntime_parity(bits, block, symmetric, k):
    n, m = 48, 5
    _, q, scale, zero = _quantized(n, k, bits, block, symmetric, seed=bits * block + k)
    packed = pack_matmulnbits(q, scale, None if symmetric else zero, bits, block)
    sess = ort.InferenceSession(_matmulnbits_model(packed).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    a = torch.randn(m, k, generator=torch.Generator().manual_seed(7))
    (y,) = sess.run(None, {"A": a.numpy()})
    ref = (a.double() @ dequantize_weight(q, scale, zero, block).double().T).numpy()
    # agreement to fp32 rounding of a K-term dot product
    tol = 4 * np.finfo(np.float32).eps * (np.abs(a.numpy()) @ np.abs(
        dequantize_weight(q, scale, zero, block).numpy().T)) + 1e-7
    assert np.all(np.abs(y - ref) <= tol), float(np.max(np.abs(y - ref)))
