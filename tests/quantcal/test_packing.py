"""MatMulNBits and GatherBlockQuantized packing: bit-level round trips, and parity of
one-node onnxruntime graphs (CPU provider) against the torch dequantize reference for every
bits/group/symmetry."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from quantcal.formats import Int4, Int8
from quantcal.packing import (
    dequantize_matmulnbits, pack_codes, pack_gather_block_quantized, pack_matmulnbits,
    unpack_codes, unpack_matmulnbits,
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


def _one_node_model(op: str, inputs: list[str], consts: dict, x, y, **attrs) -> onnx.ModelProto:
    """One com.microsoft node: the graph input ``x`` and the constants (None: left out) in,
    ``y`` out."""
    inits = [numpy_helper.from_array(t.numpy(), n) for n, t in consts.items() if t is not None]
    names = [i for i in inputs if i not in consts or consts[i] is not None]
    node = helper.make_node(op, names, ["Y"], domain="com.microsoft", name=f"/parity/{op}",
                            **attrs)
    graph = helper.make_graph([node], "parity", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


def _matmulnbits_model(packed, m_dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    return _one_node_model(
        "MatMulNBits", ["A", "B", "scales", "zero_points"],
        {"B": packed.B, "scales": packed.scales, "zero_points": packed.zero_points},
        helper.make_tensor_value_info("A", m_dtype, ["M", packed.K]),
        helper.make_tensor_value_info("Y", m_dtype, ["M", packed.N]),
        K=packed.K, N=packed.N, bits=packed.bits, block_size=packed.block_size,
        accuracy_level=0)


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


def _gather_model(packed) -> onnx.ModelProto:
    return _one_node_model(
        "GatherBlockQuantized", ["data", "ids", "scales", "zero_points"],
        {"data": packed.data, "scales": packed.scales, "zero_points": packed.zero_points},
        helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"]),
        helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["B", "S", packed.width]),
        bits=packed.bits, block_size=packed.block_size, gather_axis=0, quantize_axis=1)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("k", [256, 200, 320])  # 320: an odd number of 64- and 128-blocks
def test_gather_block_quantized_onnxruntime_parity(bits, block, symmetric, k):
    v = 40
    fmt = (Int4 if bits == 4 else Int8)(group_size=block, symmetric=symmetric)
    _, q, scale, zero = _quantized(v, k, bits, block, symmetric, seed=bits * block + k + 1)
    packed = pack_gather_block_quantized(q, scale, None if symmetric else zero, bits, block,
                                         blocks=fmt.gather_blocks(k))
    assert packed.data.shape == (v, fmt.gather_blocks(k) * block * bits // 8)
    assert packed.width == fmt.gather_blocks(k) * block >= k
    sess = ort.InferenceSession(_gather_model(packed).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    ids = np.array([[0, 7, v - 1], [3, 3, 12]], np.int64)
    (y,) = sess.run(None, {"ids": ids})
    assert y.shape == (2, 3, packed.width)
    ref = dequantize_weight(q, scale, zero, block).numpy()  # (V, K): (q - z) * s, as the kernel
    np.testing.assert_array_equal(y[..., :k], ref[ids])


@pytest.mark.parametrize("k", [256, 192])  # 192: three 64-blocks per row, padded to four
def test_gather_layout_is_matmulnbits_and_zero_points_agree_across_kernels(k):
    """Unpadded, the table is MatMulNBits' B, scales and zero points (a tied head shares
    them); padded or not, rows hold an even number of 4-bit zero points, so packing them per
    row (the CPU kernel) equals packing them across rows (the CUDA kernels)."""
    v, block, fmt = 24, 64, Int4(64)
    _, q, scale, zero = _quantized(v, k, 4, block, symmetric=False, seed=k)
    packed = pack_gather_block_quantized(q, scale, zero, 4, block, blocks=fmt.gather_blocks(k))
    blocks = packed.scales.shape[1]
    assert blocks % 2 == 0 and (blocks == k // block) == (k == 256)
    if blocks == fmt.n_blocks(k):
        head = pack_matmulnbits(q, scale, zero, 4, block)
        assert torch.equal(packed.data, head.B.reshape(v, -1))
        assert torch.equal(packed.scales, head.scales)
        assert torch.equal(packed.zero_points, head.zero_points)
    codes = torch.nn.functional.pad(zero, (0, blocks - zero.shape[1]), value=8.0)
    across_rows = pack_codes(codes.round().to(torch.uint8).reshape(1, -1), 4)
    assert torch.equal(packed.zero_points.reshape(1, -1), across_rows)
