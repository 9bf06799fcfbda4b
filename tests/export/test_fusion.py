"""Fused projections (export/fusion.py): a block's q/k/v and gate/up of one format as one node.

The unfused graph (``fuse=False``: one node per layer, as quantcal exported before fusion)
is the independent reference. For every family and for uniform int4-g32 (asymmetric and
symmetric), int8 and fp16 plans and a mixed plan in which only block 0 fuses, the fused
graph's logits on CPU in fp32 equal the unfused graph's bit for bit, for a prefill and for
decoding steps with the cache (biases randomized, so that their concatenation counts); both
match HF's own logits (fp16 plan) or the fake-quant torch model. The groups are the ones
the plan allows (checked by layer names here, not by export/fusion.py), a packed q/k/v goes
to GroupQueryAttention as it is (split before Qwen3's and Gemma 3's per-head norms), and
the op counts agree with the plan. Per-layer parity through a fused node names the wrong
member layer. The GPU test compares a fused fp16 export with the unfused one on CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantcal.calibrate import weights
from quantcal.export import emit
from quantcal.export.builder import save_model
from quantcal.export.emit import graph_op_counts, planned_op_counts
from quantcal.export.fusion import ALL_KINDS
from quantcal.export.graphs import build_decoder
from quantcal.export.layer_parity import LAYER_KEY, layer_errors
from quantcal.export.parity import check_parity, failure_detail
from quantcal.fakequant import fake_quant_modules, swapped
from quantcal.formats import W8A8, BlockQuant, parse_format
from quantcal.models import quantizable_layers, weight_matrix
from tinymodels import ALL_FAMILIES, OnnxDecoder, build_tiny_model, tiny_config

PLANS = ("int4-g32", "int4-g32-sym", "int8", "fp16", "mixed")
SEPARATE = ("llama", "llama3", "qwen2", "qwen3", "mistral", "gemma2", "gemma3")
HEAD_NORMS = ("qwen3", "gemma3")


def _model(family: str):
    """A tiny model of ``family`` with random biases (HF initializes them to zero)."""
    model = build_tiny_model(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.5, generator=torch.Generator().manual_seed(len(name)))
    return model


def _mixed(name: str) -> str:
    """Block 0: attention int4-g32, MLP int8 (both groups fuse); block 1: q/k/v w8a8 (never
    fused), gate int4-g32 and up int8 (formats differ), the rest int8."""
    if ".layers.0." in name or ".h.0." in name:
        return "int8" if ".mlp." in name else "int4-g32"
    if name.endswith(("q_proj", "k_proj", "v_proj")):
        return "w8a8"
    return "int4-g32" if name.endswith("gate_proj") else "int8"


def _plan(model, spec: str) -> tuple[dict, dict]:
    """Formats of every linear layer and round-to-nearest qparams for them."""
    formats, qparams = {}, {}
    for name, info in quantizable_layers(model).items():
        if info.kind == "embedding":
            continue
        fmt = formats[name] = parse_format(_mixed(name) if spec == "mixed" else spec)
        w = weight_matrix(model.get_submodule(name)).detach()
        if isinstance(fmt, BlockQuant):
            s, z = weights.rtn(w, fmt.bits, fmt.group_size, fmt.symmetric)
        elif isinstance(fmt, W8A8):
            s, z = weights.rtn(w, 8, None, True)
            qparams[f"{name}/act/scale"], qparams[f"{name}/act/zero"] = (
                torch.tensor(0.05), torch.tensor(128.0))
        else:
            continue
        qparams[f"{name}/{fmt.name}/scale"], qparams[f"{name}/{fmt.name}/zero"] = s, z
    return formats, qparams


def _expected_groups(formats: dict) -> dict[str, list[str]]:
    """What the plan allows to fuse, from layer names alone: a block's q/k/v (gate/up) with
    one format that is not w8a8."""
    out = {}
    for name in formats:
        for first, parts, fused in (("q_proj", ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
                                    ("gate_proj", ("gate_proj", "up_proj"), "gate_up_proj")):
            if name.endswith("." + first):
                members = [name[:-len(first)] + p for p in parts]
                fmts = {formats[m] for m in members}
                if len(fmts) == 1 and not isinstance(formats[name], W8A8):
                    out[name[:-len(first)] + fused] = members
    return out


def _session(path, graph=None, provider: str = "CPUExecutionProvider") -> OnnxDecoder:
    """A session of ``graph`` saved to ``path`` (or of the model already there)."""
    if graph is not None:
        save_model(graph, path)
    return OnnxDecoder(path, provider)


IDS = np.random.default_rng(0).integers(1, 512, (2, 12))


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_fused_export_equals_unfused_bit_for_bit(family, plan, tmp_path):
    model = _model(family)
    formats, qparams = _plan(model, plan)
    fused = build_decoder(model, formats, qparams, np.float32, fuse=ALL_KINDS)
    separate = build_decoder(model, formats, qparams, np.float32, fuse=False)
    expected = _expected_groups(formats)
    assert fused.fused == expected and separate.fused == {}
    default = build_decoder(model, formats, qparams, np.float32).fused  # q/k/v only
    assert default == {k: v for k, v in expected.items() if k.endswith("qkv_proj")}
    if family in SEPARATE:  # q/k/v and gate/up of every block, or of block 0 (mixed)
        assert len(expected) == (2 if plan == "mixed" else 2 * model.config.num_hidden_layers)
    else:  # the checkpoint fuses them already (Phi-3's qkv_proj, GPT-2's c_attn)
        assert expected == {}

    g_fused, g_separate = fused.model(), separate.model()
    saved = sum(len(m) - 1 for m in expected.values())
    planned = planned_op_counts(formats, (), expected)
    assert graph_op_counts(g_fused, formats, expected) == planned
    assert graph_op_counts(g_separate, formats) == planned_op_counts(formats)
    assert sum(planned.values()) + saved == sum(planned_op_counts(formats).values())

    got = _session(tmp_path / "fused.onnx", g_fused).decode(IDS, 3)
    ref = _session(tmp_path / "separate.onnx", g_separate).decode(IDS, 3)
    for step, (a, b) in enumerate(zip(got, ref)):
        assert np.array_equal(a, b), (step, float(np.abs(a - b).max()))

    # and both against torch: HF itself for the fp16 plan, else its fake-quant stand-ins
    with swapped(model, fake_quant_modules(model, formats, qparams)), torch.no_grad():
        torch_logits = model(torch.from_numpy(IDS)).logits.numpy()
    assert np.abs(got[0] - torch_logits).max() <= 1e-3 + 1e-4 * np.abs(torch_logits).max()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3", "phi3"])
def test_packed_qkv_goes_to_group_query_attention(family):
    """One q/k/v node per block; GroupQueryAttention takes its output as packed QKV (key and
    value inputs empty), but for per-head q/k norms, which need the split first. The
    unfused graph keeps three nodes (Phi-3: its checkpoint's one node, split)."""
    model = _model(family)
    formats, qparams = _plan(model, "int4-g32")
    for fuse in (True, False):
        graph = build_decoder(model, formats, qparams, np.float32, fuse=fuse).model().graph
        nodes = {n.name: n for n in graph.node}
        producer = {o: n for n in graph.node for o in n.output}

        def source(tensor: str):  # the node computing ``tensor``, past a bias Add
            node = producer[tensor]
            return producer[node.input[0]] if node.op_type == "Add" else node
        gqa = nodes["/model/layers.0/self_attn/GroupQueryAttention"]
        qkv = nodes.get("/model/layers.0/self_attn/qkv_proj/MatMulNBits")
        split = nodes.get("/model/layers.0/self_attn/qkv_proj/Split")
        assert (qkv is not None) == (fuse or family == "phi3")
        assert "/model/layers.0/self_attn/q_proj/MatMulNBits" in nodes or qkv is not None
        packed = fuse and family not in HEAD_NORMS
        assert (list(gqa.input[1:3]) == ["", ""]) == packed
        if packed:
            assert source(gqa.input[0]) is qkv and split is None
        elif qkv is not None:
            assert source(split.input[0]) is qkv
        up = "/model/layers.0/mlp/gate_up_proj/MatMulNBits"
        assert (up in nodes) == (family == "phi3")  # gate/up fuse only when asked
    graph = build_decoder(model, formats, qparams, np.float32, fuse=ALL_KINDS).model().graph
    assert "/model/layers.0/mlp/gate_up_proj/MatMulNBits" in {n.name for n in graph.node}


def _wide(family: str = "llama"):
    """Hidden 96, MLP 160: partial last groups for int8 (g128) and int4-g64."""
    import transformers

    cfg = tiny_config(family)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads = 96, 160, 6
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("fmt", ["int8", "int4-g64", "int4-g32-sym"])
def test_each_layer_of_a_fused_node_matches_its_module(fmt):
    model = _wide()
    formats, qparams = _plan(model, fmt)
    groups = build_decoder(model, formats, qparams, np.float32, fuse=ALL_KINDS).fused
    assert len(groups) == 4
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    errors = layer_errors(model, formats, qparams, ids, dtype=np.float32, provider="cpu",
                          fused=groups)
    alone = layer_errors(model, formats, qparams, ids, dtype=np.float32, provider="cpu")
    assert set(errors) == set(formats)
    for name, (err, ref) in errors.items():
        assert ref > 0 and err <= 1e-5 * ref, (name, err, ref)
        assert err == alone[name][0], name  # the fused node's rows are the layer's own


def _wrong_codes(original, wrong: str):
    """An emitter bug in one layer: every code of ``wrong``'s last group off by one."""
    def pack(layer, fmt, w, qp):
        if layer == wrong:
            from quantcal import qmath

            q = qmath.quantize_weight(w, qp["scale"], qp["zero"], fmt.bits, fmt.group_size)
            q[:, -(w.shape[1] % fmt.group_size or fmt.group_size):] ^= 1
            qp = {**qp, "codes": q}
        return original(layer, fmt, w, qp)
    return pack


@pytest.mark.parametrize("wrong", ["model.layers.1.self_attn.k_proj",
                                   "model.layers.0.mlp.up_proj"])
def test_a_wrong_member_of_a_fused_node_is_named(wrong, tmp_path, monkeypatch):
    model = _wide()
    formats, qparams = _plan(model, "int8")
    monkeypatch.setattr(emit, "pack_block", _wrong_codes(emit.pack_block, wrong))
    builder = build_decoder(model, formats, qparams, np.float32, fuse=ALL_KINDS)
    assert any(wrong in members for members in builder.fused.values())
    save_model(builder.model(), tmp_path / "m.onnx")
    p = check_parity(tmp_path / "m.onnx", model, formats, qparams, provider="cpu",
                     dtype=np.float32, fused=builder.fused)
    assert p[f"{LAYER_KEY}{wrong}"] == p["worst_layer_max_abs"] > 0
    assert p["worst_layer_rel"] > p["layer_rel_tolerance"]
    others = [m for g in builder.fused.values() if wrong in g for m in g if m != wrong]
    assert all(p[f"{LAYER_KEY}{m}"] < 1e-3 * p["worst_layer_max_abs"] for m in others)
    detail = failure_detail(p, {n: f.name for n, f in formats.items()})
    assert f"layer {wrong} (int8) disagrees" in detail


def test_old_export_records_read_without_fused():
    from quantcal.provenance import ExportRecord

    old = ExportRecord(model="m", provider="cpu", dtype="float32", path="model.onnx",
                       file_bytes=1).to_dict()
    del old["fused"]
    assert ExportRecord.from_dict(old).fused == {}


def _invoke(*args) -> str:
    from click.testing import CliRunner

    from quantcal.cli import cli

    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def test_export_fuses_by_default_and_no_fuse_does_not(tiny_llama_dir, tmp_path, c4_file):
    """`quantcal export` (q/k/v fused), `--fuse-mlp` and `--no-fuse` on one plan where block
    0 fuses both groups and block 1 only gate/up: all pass their checks, record what they
    fused, hold the nodes the plan implies, give the same logits and per-layer errors."""
    import json

    import onnx

    from quantcal.plancheck import resolved_formats
    from quantcal.provenance import record_path
    from quantcal.rundir import RunDir

    run = tmp_path / "run"
    _invoke("calibrate", "--model", tiny_llama_dir, "--data", c4_file, "--samples", "4",
            "--seq-len", "32", "--batch-size", "2", "--sensitivity", "fast",
            "--sensitivity-samples", "2", "--formats", "int4-g32,int8", "--target-bits", "9",
            "--run", run)
    plan = tmp_path / "plan.json"
    blocks = {"model.layers.0.*": "int4-g32", "model.layers.1.self_attn.[qo]_proj": "int8",
              "model.layers.1.self_attn.[kv]_proj": "int4-g32", "model.layers.1.mlp.*": "int8"}
    _invoke("plan", "--run", run, "--no-measure", "-o", plan, "--target-bits", "9",
            *[x for p, f in blocks.items() for x in ("--force", f"{p}={f}")])
    record = RunDir(run).read_run()
    formats = resolved_formats(RunDir(run).read_plan(plan), record, ["int4-g32", "int8"])
    embeddings = {n for n, i in record.layers.items() if i.kind == "embedding"}
    records, logits = {}, {}
    for name, flags in (("fused", ("--fuse-mlp",)), ("qkv", ()), ("separate", ("--no-fuse",))):
        path = tmp_path / name / f"{name}.onnx"
        _invoke("export", "--provider", "cpu", "--run", run, "--plan", plan, "-o", path, *flags)
        records[name] = rec = json.loads(record_path(path).read_text())
        assert rec["passed"]
        graph = onnx.load(str(path), load_external_data=False)
        assert rec["ops"] == graph_op_counts(graph)
        assert graph_op_counts(graph, formats, rec["fused"]) == planned_op_counts(
            formats, embeddings, rec["fused"])
        logits[name] = _session(path).decode(IDS, 2)
    attn, mlp = "model.layers.{}.self_attn.", "model.layers.{}.mlp."
    assert records["fused"]["fused"] == {
        attn.format(0) + "qkv_proj": [attn.format(0) + p for p in ("q_proj", "k_proj", "v_proj")],
        **{mlp.format(i) + "gate_up_proj": [mlp.format(i) + "gate_proj", mlp.format(i) + "up_proj"]
           for i in (0, 1)}}
    assert records["qkv"]["fused"] == {
        k: v for k, v in records["fused"]["fused"].items() if k.endswith("qkv_proj")}
    assert records["separate"]["fused"] == {}
    assert sum(records["separate"]["ops"].values()) - sum(records["fused"]["ops"].values()) == 4
    assert sum(records["separate"]["ops"].values()) - sum(records["qkv"]["ops"].values()) == 2
    for a, b, c in zip(logits["fused"], logits["separate"], logits["qkv"]):
        assert np.array_equal(a, b) and np.array_equal(c, b)
    layer = {n: {k: v for k, v in r["parity"].items() if k.startswith(LAYER_KEY)}
             for n, r in records.items()}
    assert len(layer["fused"]) == len(formats) and layer["fused"] == layer["separate"]


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "phi3"])
@pytest.mark.parametrize("plan", ["int4-g32", "int8", "fp16"])
def test_fused_fp16_export_matches_unfused_on_cuda(family, plan, tmp_path):
    """The fp16 (``--provider cuda``) graphs on the CUDA provider, prefill and cached steps
    (a packed q/k/v into CUDA's GroupQueryAttention, Gemma 2's window and soft-cap too):
    the fused node's kernels (another N) may round in another order, so the two agree
    within fp16 rounding: twice torch's own fp16 error on the same model, or 1% of the
    largest logit (a member out of place is off by the logits' own size); each passes the
    export's fp16 rule against the fake-quant torch model."""
    from quantcal.export.parity import HALF_MARGIN, half_deviation

    model = _model(family)
    formats, qparams = _plan(model, plan)
    cuda = "CUDAExecutionProvider"
    got = _session(tmp_path / "fused.onnx",
                   build_decoder(model, formats, qparams, np.float16, fuse=ALL_KINDS).model(),
                   cuda).decode(IDS, 3)
    ref = _session(tmp_path / "separate.onnx",
                   build_decoder(model, formats, qparams, np.float16, fuse=False).model(),
                   cuda).decode(IDS, 3)
    ids = torch.from_numpy(IDS)
    with swapped(model, fake_quant_modules(model, formats, qparams)), torch.no_grad():
        torch_logits = model(ids).logits.double().numpy()
        own = half_deviation(model, ids, torch_logits)
    scale = float(np.abs(torch_logits).max())
    for step, (a, b) in enumerate(zip(got, ref)):
        diff = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
        assert diff <= max(2 * own, 1e-2 * scale), (step, diff, own, scale)
    for logits in (got[0], ref[0]):
        err = np.abs(logits.astype(np.float64) - torch_logits).max()
        assert err <= max(2e-2 * scale + 1e-2, HALF_MARGIN * own), (err, own, scale)
