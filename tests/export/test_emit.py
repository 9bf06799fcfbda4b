"""export.emit: one layer per format, run in onnxruntime (CPU), against the torch reference
``FakeQuantLinear`` built from the same weights and qparams; the token embedding likewise
against ``FakeQuantEmbedding``, alone or sharing a tied head's table; node names and op
counts."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from quantcal.calibrate.qparams import (
    activation_qparams, compute_embedding_qparams, format_qparams,
)
from quantcal.calibrate.stats import LayerStats
from quantcal.errors import QuantcalError
from quantcal.export.builder import GraphBuilder
from quantcal.export.emit import (
    block_initializers, emit_embedding, emit_linear, gather_shared, graph_op_counts,
    matmulnbits, pack_block, planned_op_counts,
)
from quantcal.fakequant import fake_quant_module, layer_qparams
from quantcal.formats import FP16, W8A8, BlockQuant, Format, parse_format

LAYER = "model.layers.0.mlp.down_proj"
PREFIX = "/model/layers.0/mlp/down_proj"
FORMATS = ["fp16", "int8", "int8-g32", "int4-g32", "int4-g64", "int4-g128",
           "int4-g128-sym", "w8a8"]
N, K = 48, 200  # K is a multiple of no group size: the last block is padded
OBSERVER = "minmax"


def _linear(bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0.0, 0.05)
        lin.weight[:, 7] *= 8.0  # an outlier input channel, as real layers have
        if bias:
            lin.bias.normal_(0.0, 0.5)
    return lin


def _inputs(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, K, generator=g)  # (B, S, K)
    x[..., 3] *= 6.0
    return x


def _qparams(fmt: Format, lin: nn.Linear, x: torch.Tensor, gptq: bool
             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    stats = LayerStats(K, N, "cpu", hessian=gptq)
    with torch.no_grad():
        stats.update(x, lin(x))
    qp = format_qparams(fmt, lin.weight.detach(), stats, "aware")
    return qp, activation_qparams(stats, OBSERVER)


def _graph(fmt: Format, lin: nn.Linear, qp, act_qp, dtype=np.float32) -> onnx.ModelProto:
    b = GraphBuilder(dtype)
    x = b.input("x", b.elem_type, ["B", "S", K])
    y = emit_linear(b, LAYER, x, lin.weight.detach(), lin.bias, fmt, qp, act_qp)
    b.output(y, b.elem_type, ["B", "S", N])
    model = b.model()
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _reference(fmt: Format, lin: nn.Linear, qp, act_qp, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return fake_quant_module(lin, fmt, qp, act_qp)(x).numpy()


def _rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out.astype(np.float32) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("gptq", [False, True], ids=["clip", "gptq"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("name", FORMATS)
def test_matches_fake_quant_fp32(name: str, bias: bool, gptq: bool) -> None:
    fmt = parse_format(name)
    if gptq and not isinstance(fmt, BlockQuant):
        pytest.skip("GPTQ codes exist only for the MatMulNBits formats")
    lin, x = _linear(bias), _inputs()
    qp, act_qp = _qparams(fmt, lin, x, gptq)
    assert ("codes" in qp) == gptq
    out = _run(_graph(fmt, lin, qp, act_qp), x.numpy())
    ref = _reference(fmt, lin, qp, act_qp, x)
    assert out.shape == (2, 5, N)
    assert _rel_err(out, ref) <= 1e-5


def test_quantization_is_real() -> None:
    """The parity above is not vacuous: int4 output differs from the float layer."""
    lin, x = _linear(True), _inputs()
    fmt = parse_format("int4-g128")
    qp, act_qp = _qparams(fmt, lin, x, gptq=False)
    out = _run(_graph(fmt, lin, qp, act_qp), x.numpy())
    with torch.no_grad():
        exact = lin(x).numpy()
    assert _rel_err(out, exact) > 1e-3


def _fp16_qparams(qp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scales rounded to fp16, as an fp16 graph stores them."""
    return {k: v.half().float() if k == "scale" else v for k, v in qp.items()}


@pytest.mark.parametrize("name", ["fp16", "int8-g32", "int4-g32", "int4-g128-sym", "w8a8"])
def test_matches_fake_quant_fp16(name: str) -> None:
    fmt = parse_format(name)
    lin, x = _linear(True), _inputs()
    qp, act_qp = _qparams(fmt, lin, x, gptq=False)
    qp, act_qp = _fp16_qparams(qp), _fp16_qparams(act_qp)
    x16 = x.half()
    out = _run(_graph(fmt, lin, qp, act_qp, np.float16), x16.numpy())
    assert out.dtype == np.float16
    # fp32 reference on the same fp16 inputs and fp16 scales; what remains is fp16
    # rounding of the output, the bias and (fp16 format) the weight
    ref = _reference(fmt, lin, qp, act_qp, x16.float())
    assert _rel_err(out, ref) <= 2e-3


def _nodes(model: onnx.ModelProto) -> list[tuple[str, str]]:
    return [(n.op_type, n.name) for n in model.graph.node]


@pytest.mark.parametrize("name, expected", [
    ("fp16", [("MatMul", f"{PREFIX}/MatMul")]),
    ("int4-g32", [("MatMulNBits", f"{PREFIX}/MatMulNBits")]),
    ("int8", [("MatMulNBits", f"{PREFIX}/MatMulNBits")]),
    ("w8a8", [("QuantizeLinear", f"{PREFIX}/QuantizeLinear"),
              ("DequantizeLinear", f"{PREFIX}/DequantizeLinear"),
              ("DequantizeLinear", f"{PREFIX}/weight/DequantizeLinear"),
              ("MatMul", f"{PREFIX}/MatMul")]),
])
def test_node_names(name: str, expected: list[tuple[str, str]]) -> None:
    fmt = parse_format(name)
    lin, x = _linear(True), _inputs()
    qp, act_qp = _qparams(fmt, lin, x, gptq=False)
    model = _graph(fmt, lin, qp, act_qp)
    assert _nodes(model) == expected + [("Add", f"{PREFIX}/Add")]
    assert all(i.name.startswith(LAYER + ".") for i in model.graph.initializer)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("name, n_inputs", [("int4-g64", 4), ("int4-g64-sym", 3)])
def test_matmulnbits_layout(name: str, n_inputs: int) -> None:
    fmt = parse_format(name)
    lin, x = _linear(False), _inputs()
    qp, _ = _qparams(fmt, lin, x, gptq=False)
    model = _graph(fmt, lin, qp, None)
    (node,) = model.graph.node
    assert node.domain == "com.microsoft" and len(node.input) == n_inputs
    assert _attrs(node) == {"K": K, "N": N, "bits": 4, "block_size": 64, "accuracy_level": 0}
    inits = {i.name: i for i in model.graph.initializer}
    assert list(inits[f"{LAYER}.weight_q"].dims) == [N, 4, 32]  # (N, G, 64 * 4 / 8)
    assert list(inits[f"{LAYER}.weight_scales"].dims) == [N, 4]


def test_w8a8_weight_is_signed_per_channel() -> None:
    fmt = W8A8()
    lin, x = _linear(False), _inputs()
    qp, act_qp = _qparams(fmt, lin, x, gptq=False)
    model = _graph(fmt, lin, qp, act_qp)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert inits[f"{LAYER}.weight_q"].dtype == np.int8
    assert inits[f"{LAYER}.weight_q"].shape == (K, N)
    assert inits[f"{LAYER}.weight_scale"].shape == (N,)
    assert not inits[f"{LAYER}.weight_zero"].any()  # symmetric: zero points all 0
    assert inits[f"{LAYER}.input_zero"].dtype == np.uint8


def test_errors() -> None:
    lin, x = _linear(False), _inputs()
    b = GraphBuilder()
    b.input("x", b.elem_type, ["B", "S", K])
    with pytest.raises(QuantcalError, match="activation qparams"):
        emit_linear(b, LAYER, "x", lin.weight, None, W8A8(), {"scale": torch.ones(N, 1),
                                                               "zero": torch.full((N, 1), 128.)})
    fmt = parse_format("int4-g32-sym")
    qp, _ = _qparams(fmt, lin, x, gptq=False)
    with pytest.raises(QuantcalError, match="zero points"):
        emit_linear(b, "other", "x", lin.weight, None, fmt, {**qp, "zero": qp["zero"] - 1})
    with pytest.raises(QuantcalError, match="no ONNX emitter"):
        emit_linear(b, "third", "x", lin.weight, None, Format(), {})


def test_op_counts_of_a_plan() -> None:
    plan = {"model.layers.0.self_attn.q_proj": parse_format("int4-g32"),
            "model.layers.0.self_attn.k_proj": parse_format("int4-g128"),
            "model.layers.0.mlp.up_proj": parse_format("int8"),
            "model.layers.0.mlp.down_proj": W8A8(),
            "lm_head": FP16()}
    lin, x = _linear(True), _inputs()
    b = GraphBuilder()
    b.input("x", b.elem_type, ["B", "S", K])
    outs = []
    for layer, fmt in plan.items():
        qp, act_qp = _qparams(fmt, lin, x, gptq=False)
        outs.append(emit_linear(b, layer, "x", lin.weight, lin.bias, fmt, qp, act_qp))
    for y in outs:
        b.output(y, b.elem_type, ["B", "S", N])
    model = b.model()
    expected = {"MatMulNBits.bits4": 2, "MatMulNBits.bits8": 1, "QuantizeLinear": 1,
                "DequantizeLinear": 2, "MatMul": 2}
    assert planned_op_counts(plan) == expected
    assert graph_op_counts(model) == expected
    assert graph_op_counts(model, {"lm_head": FP16()}) == {"MatMul": 1}
    results = _run(model, x.numpy())
    assert len(results.shape) == 3  # all five layers ran side by side


EMB = "model.embed_tokens"
EMB_PREFIX = "/model/embed_tokens"
V, H = 96, 200  # H is a multiple of no group size: the last block is padded
IDS = np.array([[0, 5, V - 1, 5], [17, 2, 40, 1]], np.int64)


def _embedding(seed: int = 3) -> nn.Embedding:
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(V, H, generator=g) * 0.05
    table[:, 11] *= 8.0
    return nn.Embedding.from_pretrained(table)


def _table_qparams(fmt: Format, emb: nn.Embedding) -> dict[str, torch.Tensor]:
    if isinstance(fmt, FP16):
        return {}
    return layer_qparams(compute_embedding_qparams({EMB: emb.weight}, (fmt,)), EMB, fmt)


def _embedding_graph(fmt: Format, emb: nn.Embedding, qp, dtype=np.float32) -> onnx.ModelProto:
    b = GraphBuilder(dtype)
    ids = b.input("ids", onnx.TensorProto.INT64, ["B", "S"])
    y = emit_embedding(b, EMB, ids, emb.weight, fmt, qp)
    b.output(y, b.elem_type, ["B", "S", H])
    model = b.model()
    onnx.checker.check_model(model)
    return model


def _rows(model: onnx.ModelProto) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"ids": IDS})[0]


def _reference_rows(fmt: Format, emb: nn.Embedding, qp) -> np.ndarray:
    with torch.no_grad():
        if isinstance(fmt, FP16):
            return emb(torch.from_numpy(IDS)).numpy()
        return fake_quant_module(emb, fmt, qp)(torch.from_numpy(IDS)).numpy()


@pytest.mark.parametrize("name", ["fp16", "int8", "int8-g32", "int4-g32", "int4-g64",
                                  "int4-g128", "int4-g128-sym", "int4-g32-sym"])
def test_embedding_matches_fake_quant(name: str) -> None:
    fmt, emb = parse_format(name), _embedding()
    qp = _table_qparams(fmt, emb)
    out = _rows(_embedding_graph(fmt, emb, qp))
    ref = _reference_rows(fmt, emb, qp)
    assert out.shape == (2, 4, H)
    np.testing.assert_array_equal(out, ref)  # the same (q - z) * s in fp32
    if not isinstance(fmt, FP16):
        assert _rel_err(out, emb(torch.from_numpy(IDS)).detach().numpy()) > 1e-3  # real
    half = _rows(_embedding_graph(fmt, emb, _fp16_qparams(qp), np.float16))
    assert half.dtype == np.float16
    assert _rel_err(half, _reference_rows(fmt, emb, _fp16_qparams(qp))) <= 1e-3


@pytest.mark.parametrize("name, nodes, blocks", [
    ("fp16", ["Gather"], None),
    ("int4-g32", ["GatherBlockQuantized", "Slice"], 8),  # 7 blocks, padded to 8
    # symmetric: explicit mid-point zero points (CPU and CUDA kernels default differently)
    ("int4-g64-sym", ["ConstantOfShape", "GatherBlockQuantized", "Slice"], 4),
    ("int8-g32", ["GatherBlockQuantized", "Slice"], 7),
])
def test_embedding_nodes_and_layout(name: str, nodes: list[str], blocks: int | None) -> None:
    fmt, emb = parse_format(name), _embedding()
    model = _embedding_graph(fmt, emb, _table_qparams(fmt, emb))
    assert _nodes(model) == [(op, f"{EMB_PREFIX}/{op}") for op in nodes]
    assert all(i.name.startswith(EMB + ".") for i in model.graph.initializer)
    if blocks is None:
        return
    node = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    assert node.domain == "com.microsoft"
    assert _attrs(node) == {"bits": fmt.bits, "block_size": fmt.group_size, "gather_axis": 0,
                            "quantize_axis": 1}
    inits = {i.name: i for i in model.graph.initializer}
    assert list(inits[f"{EMB}.weight_q"].dims) == [V, blocks * fmt.group_size * fmt.bits // 8]
    assert list(inits[f"{EMB}.weight_scales"].dims) == [V, blocks]


def test_tied_head_and_embedding_share_one_table() -> None:
    """GatherBlockQuantized reads the head's MatMulNBits initializers (B reshaped to 2-D):
    the rows are the embedding's fake-quant rows and the head multiplies by the same table."""
    fmt, emb = parse_format("int4-g32-sym"), _embedding()
    qp = _table_qparams(fmt, emb)
    b = GraphBuilder()
    ids = b.input("ids", onnx.TensorProto.INT64, ["B", "S"])
    x = b.input("x", b.elem_type, ["B", "T", H])
    packed = pack_block(EMB, fmt, emb.weight, qp)
    weight = block_initializers(b, EMB, packed)
    rows = gather_shared(b, EMB, ids, weight, packed, fmt)
    logits = matmulnbits(b, "lm_head", x, weight, packed)
    b.output(rows, b.elem_type, ["B", "S", H])
    b.output(logits, b.elem_type, ["B", "T", V])
    model = b.model()
    onnx.checker.check_model(model)
    uint8 = [i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.UINT8]
    assert uint8 == [f"{EMB}.weight_q"]  # stored once
    xs = _inputs()  # (2, 5, H)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got_rows, got_logits = sess.run(None, {"ids": IDS, "x": xs.numpy()})
    fq = fake_quant_module(emb, fmt, qp)
    np.testing.assert_array_equal(got_rows, _reference_rows(fmt, emb, qp))
    ref_logits = (xs @ fq.weight.T).numpy()
    assert _rel_err(got_logits, ref_logits) <= 1e-5
    assert graph_op_counts(model, {EMB: fmt, "lm_head": fmt}) == {
        "GatherBlockQuantized.bits4": 1, "MatMulNBits.bits4": 1}


def test_embedding_op_counts_and_errors() -> None:
    plan = {EMB: parse_format("int4-g32"), "lm_head": parse_format("int8"),
            "model.layers.0.mlp.up_proj": FP16()}
    assert planned_op_counts(plan, {EMB}) == {"GatherBlockQuantized.bits4": 1,
                                              "MatMulNBits.bits8": 1, "MatMul": 1}
    assert planned_op_counts({**plan, EMB: FP16()}, {EMB}) == {"MatMulNBits.bits8": 1,
                                                               "MatMul": 1}
    b = GraphBuilder()
    with pytest.raises(QuantcalError, match="an embedding takes fp16, int8 or int4-gN"):
        emit_embedding(b, EMB, "ids", _embedding().weight, W8A8(), {})
