"""The one-node ONNX graphs ``quantcal bench kernels`` times, with random weights.

:func:`kernel_model` returns a serialized model with one input ``A`` (M, K) in the
activation dtype and one output ``Y{i}`` (M, N_i) per node:

- ``fp16`` (layout ``matmul``): a MatMul with a (K, N) initializer;
- MatMulNBits (bits 4 or 8, any block size it takes), layouts ``plain`` and ``fpa_intb``:
  ``B``, ``scales`` and ``zero_points`` laid out as quantcal exports them
  (:mod:`quantcal.packing`), random codes (the kernels' speed does not depend on them);
- ``prepacked`` / ``prepacked-sm90``: the weights quantized and packed by onnxruntime's own
  ``CudaQuantizer.matmulnbits_prepacked_blockwise_quantize`` into its fpA_intB layout, and
  the node's ``weight_prepacked`` attribute 1 (SM80 layout) or 2 (SM90).

A shape of several parts is, unfused, one node per part reading the same ``A`` (as q, k and
v read one normed input), or, fused, one node of N = the parts' sum. Reads nothing; writes
nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from quantcal.errors import QuantcalError
from quantcal.latency import MATMUL, PREPACKED, PREPACKED_SM90, parse_kernel

_ONNX = {np.dtype(np.float16): TensorProto.FLOAT16, np.dtype(np.float32): TensorProto.FLOAT}
_PREPACK_ARCH = {PREPACKED: (80, 1), PREPACKED_SM90: (90, 2)}  # force_arch, weight_prepacked


@dataclass(frozen=True)
class Shape:
    """Projections ``parts`` (their N) reading one (M, K) input; ``fused``: one node."""

    parts: tuple[int, ...]
    k: int
    fused: bool = False
    label: str = ""

    @property
    def outputs(self) -> list[int]:
        """N of each output (one per node)."""
        return [sum(self.parts)] if self.fused else list(self.parts)

    def describe(self) -> str:
        joined = "+".join(map(str, self.parts))
        return f"{joined}x{self.k}" + (" fused" if self.fused else "")


def _plain_weight(rng: np.random.Generator, bits: int, block: int, symmetric: bool, n: int,
                  k: int, dtype: np.dtype) -> dict[str, np.ndarray]:
    """Random MatMulNBits inputs: codes (N, G, blob), scales (N, G), zero points."""
    blocks = math.ceil(k / block)
    out = {"B": rng.integers(0, 256, (n, blocks, block * bits // 8), dtype=np.uint8),
           "scales": rng.uniform(1e-3, 1e-2, (n, blocks)).astype(dtype)}
    if not symmetric:
        out["zero_points"] = rng.integers(0, 256, (n, math.ceil(blocks * bits / 8)),
                                          dtype=np.uint8)
    return out


def _prepacked_weight(rng: np.random.Generator, bits: int, block: int, symmetric: bool, n: int,
                      k: int, dtype: np.dtype, layout: str) -> dict[str, np.ndarray]:
    """MatMulNBits inputs quantized and packed by onnxruntime for its fpA_intB kernels."""
    try:
        import torch
        from onnxruntime.quantization.cuda_quantizer import CudaQuantizer
    except ImportError as exc:
        raise QuantcalError(f"this onnxruntime has no CudaQuantizer ({exc})") from None
    arch, _ = _PREPACK_ARCH[layout]
    weights = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32) * 0.02)
    try:
        packed, scales, zeros = CudaQuantizer.matmulnbits_prepacked_blockwise_quantize(
            weights, bits, block, arch, symmetric=symmetric, return_zero_points=True)
    except (ValueError, RuntimeError) as exc:
        raise QuantcalError(f"onnxruntime cannot prepack it: {exc}") from None
    out = {"B": packed.numpy(), "scales": scales.numpy().astype(dtype)}
    if not symmetric:
        out["zero_points"] = zeros.numpy()
    return out


def _node(fmt: str, layout: str, n: int, k: int, index: int, dtype: np.dtype,
          rng: np.random.Generator) -> tuple[helper.NodeProto, list]:
    bits, block, symmetric = parse_kernel(fmt)
    out = f"Y{index}"
    if bits == 16:
        weight = numpy_helper.from_array(
            (rng.standard_normal((k, n), dtype=np.float32) * 0.02).astype(dtype), f"W{index}")
        return helper.make_node("MatMul", ["A", weight.name], [out], name=f"MatMul{index}"), [
            weight]
    if layout in _PREPACK_ARCH:
        arrays = _prepacked_weight(rng, bits, block, symmetric, n, k, dtype, layout)
    else:
        arrays = _plain_weight(rng, bits, block, symmetric, n, k, dtype)
    inits = [numpy_helper.from_array(a, f"{name}{index}") for name, a in arrays.items()]
    attrs = dict(K=k, N=n, bits=bits, block_size=block)
    if layout in _PREPACK_ARCH:
        attrs["weight_prepacked"] = _PREPACK_ARCH[layout][1]
    inputs = ["A", f"B{index}", f"scales{index}"] + (
        [] if symmetric else [f"zero_points{index}"])
    node = helper.make_node("MatMulNBits", inputs, [out], name=f"MatMulNBits{index}",
                            domain="com.microsoft", **attrs)
    return node, inits


def kernel_model(fmt: str, layout: str, shape: Shape, dtype: np.dtype, seed: int = 0) -> bytes:
    """The serialized one-node (or one node per part) model of ``fmt`` in ``layout``.

    Raises:
        QuantcalError: the layout cannot be built here (fp16 outside ``matmul``, a quantized
            format in ``matmul``, prepacking refused).
    """
    dtype = np.dtype(dtype)
    if (parse_kernel(fmt)[0] == 16) != (layout == MATMUL):
        raise QuantcalError(f"{fmt} has no {layout} layout")
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    for i, n in enumerate(shape.outputs):
        node, weights = _node(fmt, layout, n, shape.k, i, dtype, rng)
        nodes.append(node)
        inits += weights
    elem = _ONNX[dtype]
    graph = helper.make_graph(
        nodes, "kernel", [helper.make_tensor_value_info("A", elem, ["M", shape.k])],
        [helper.make_tensor_value_info(f"Y{i}", elem, ["M", n])
         for i, n in enumerate(shape.outputs)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model.SerializeToString()
