"""Export's host memory does not grow with the model's depth.

Two tiny Llama models, 2 and 8 blocks wide enough (hidden 512, MLP 1536: 12.6 MB of fp32
weights a block) that a block's bytes dominate the interpreter's noise, saved in bfloat16
as real checkpoints are, calibrated and planned with every block in int4. Each export runs
alone in a fresh Python process that measures itself, independently of quantcal's own peak
figures: its resident set (``VmRSS``) just before ``export_onnx``, then the resident
high-water mark (``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs``) when it
returns. The export's growth above that baseline may differ between 2 and 8 blocks by one
block's fp32 bytes, plus what the onnxruntime session that verifies the export itself holds
more for 6 more blocks (on CPU it keeps the exported, packed weights in host memory; on a
GPU they sit on the device), measured the same way in a process that only opens the
exported model and runs one prefill.

Two things would grow with depth without being a copy of the model, and are kept small:
the far-position check's past KV cache (activations, 2 x layers x positions; capped by
``parity_batch.LONG_BYTES``) by 64 positions; and glibc's heap, which serves allocations
below its dynamic mmap threshold (up to 32 MiB) from the heap, where freed blocks of a few
MB fragment and stay resident, while a real model's tensors (hundreds of MB) are mapped
and unmapped: the probe pins the threshold at its 128 KiB default
(``MALLOC_MMAP_THRESHOLD_``), so these tensors are allocated as a large model's are.

Before the export streamed its weights, the 8-block export grew 332 MB (28 blocks) more
than the 2-block one, measured the same way (337 and 670 MB above the baseline; now 270
and 288, of which the session 13): the fp32 model, its fake-quant copy, a float64 copy for
the exact reference, the graph's initializers held twice while saving.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from quantcal.cli import cli

from memprobe import MB, STATUS, block_bytes, deep_llama_dir, probe

_EXPORT = STATUS + r'''
from quantcal.export.api import export_onnx
from quantcal.rundir import RunDir

measured(lambda: export_onnx(RunDir(Path(sys.argv[1])), provider="cpu"))
'''

_SESSION = STATUS + r'''
import numpy as np
import onnxruntime as ort

def prefill():
    sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.zeros((1, 16), np.int64),
             "attention_mask": np.ones((1, 16), np.int64),
             "position_ids": np.arange(16)[None], "total_sequence_length": np.array(16, np.int32)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    sess.run(None, feeds)

measured(prefill)
'''


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_tokenizer, c4_file) -> dict[int, dict]:
    """Per depth: the export's and its session's measured baseline and peak (bytes)."""
    root = tmp_path_factory.mktemp("export-memory")
    out = {}
    for layers in (2, 8):
        run = root / f"run-{layers}"
        res = CliRunner().invoke(cli, [
            "calibrate", "--model", str(deep_llama_dir(root, layers, tiny_tokenizer)),
            "--data", c4_file, "--samples", "4", "--seq-len", "32", "--batch-size", "2",
            "--sensitivity", "fast", "--sensitivity-samples", "2", "--formats", "int4-g32",
            "--force", "model.layers.*=int4-g32", "--device", "cpu", "--run", str(run)])
        assert res.exit_code == 0, res.output
        export = probe(_EXPORT, run)
        record = json.loads((run / "export.json").read_text())
        assert record["passed"]
        out[layers] = {"export": export, "session": probe(_SESSION, run / "model.onnx"),
                       "recorded": record["timings"]["peak_host_bytes"]}
    return out


def _growth(figures: dict) -> int:
    return figures["peak"] - figures["base"]


def test_export_peak_does_not_grow_with_depth(exports):
    grew = _growth(exports[8]["export"]) - _growth(exports[2]["export"])
    session = max(0, _growth(exports[8]["session"]) - _growth(exports[2]["session"]))
    figures = {n: {k: round(_growth(v) / MB, 1) for k, v in e.items() if k != "recorded"}
               for n, e in exports.items()}
    print(f"\nexport/session growth above baseline (MB): {figures}; one block "
          f"{block_bytes() / MB:.1f} MB")
    assert grew <= block_bytes() + session, (
        f"export grew {grew / MB:.1f} MB more at 8 blocks than at 2 (session "
        f"{session / MB:.1f} MB, one block {block_bytes() / MB:.1f} MB): {figures}")


def test_recorded_peak_agrees_with_the_measured_one(exports):
    """The export's own record (quantcal.resources) sees the same high-water mark."""
    for figures in exports.values():
        measured, recorded = figures["export"]["peak"], figures["recorded"]
        assert abs(recorded - measured) <= 0.05 * measured + 16 * MB


# --- what replaced the copies is the same computation, to the bit ---------------------

FORMATS = ["int8", "int4-g32", "w8a8", "fp16", "int4-g64-sym"]


def _plan(model) -> tuple[dict, dict]:
    """Formats cycling through :data:`FORMATS` (the embedding and a tied head int4-g32,
    stored once), min/max qparams for them, a static scale for w8a8."""
    from quantcal.calibrate import weights
    from quantcal.formats import BlockQuant, parse_format
    from quantcal.models import quantizable_layers, weight_matrix

    formats, qparams = {}, {}
    for i, (name, info) in enumerate(quantizable_layers(model).items()):
        text = "int4-g32" if info.kind == "embedding" or name == "lm_head" else FORMATS[
            i % len(FORMATS)]
        if info.kind == "conv1d" and text == "w8a8":
            text = "int8"
        fmt = formats[name] = parse_format(text)
        module = model.get_submodule(name)
        w = (module.weight if info.kind == "embedding" else weight_matrix(module)).detach()
        if text == "fp16":
            continue
        if isinstance(fmt, BlockQuant):
            s, z = weights.rtn(w, fmt.bits, fmt.group_size, fmt.symmetric)
        else:
            s, z = weights.rtn(w, 8, None, True)
            qparams[f"{name}/act/scale"] = torch.tensor(0.05)
            qparams[f"{name}/act/zero"] = torch.tensor(128.0)
        qparams[f"{name}/{fmt.name}/scale"], qparams[f"{name}/{fmt.name}/zero"] = s, z
    return formats, qparams


@pytest.mark.parametrize("family", ["qwen2", "gemma3", "phi3", "gpt2"])
def test_reference_is_the_copy_it_replaces(family):
    """The block-at-a-time reference computes what a copy of the fake-quant model converted
    by ``.double()`` / ``.half()`` computes, leaves the model as it was, and holds one
    block's stand-ins at a time."""
    import copy

    from quantcal.export.reference import fake_quant_reference
    from quantcal.fakequant import FakeQuantLinear, fake_quant_modules, swapped
    from quantcal.formats import FP16
    from quantcal.models import block_index, blocks_of, family_of
    from tinymodels import build_tiny_model

    model = build_tiny_model(family)
    formats, qparams = _plan(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        with swapped(model, fake_quant_modules(model, formats, qparams)):
            copies = {None: model, torch.float64: copy.deepcopy(model).double(),
                      torch.float16: copy.deepcopy(model).half()}
            want = {k: m(ids, use_cache=False).logits for k, m in copies.items()}
        del copies
        for dtype, logits in want.items():
            counts: list[int] = []
            with fake_quant_reference(model, formats, qparams, dtype=dtype):
                hooks = [block.register_forward_pre_hook(lambda m, a: counts.append(sum(
                    isinstance(x, FakeQuantLinear) for x in model.modules())))
                    for block in blocks_of(model, family_of(model))]  # after the reference's
                got = model(ids, use_cache=False).logits
                for hook in hooks:
                    hook.remove()
            assert got.dtype == logits.dtype and torch.equal(got, logits), dtype
            linear = {n for n, f in formats.items() if not isinstance(f, FP16)
                      and not isinstance(model.get_submodule(n), torch.nn.Embedding)}
            own = [len({n for n in linear if block_index(model, n) == i})
                   for i in range(model.config.num_hidden_layers)]
            outside = len({n for n in linear if block_index(model, n) is None})
            assert counts == [outside + n for n in own]  # the head's and this block's only
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_reference_on_the_gpu_is_the_copy_it_replaces(family, tmp_path, tiny_tokenizer):
    """fp16 on CUDA (torch's own fp16 error, ``half_deviation``): the block-at-a-time
    reference of a lazily loaded model computes what ``.half().to("cuda")`` of a copy of
    the fake-quant model computes, and leaves blocks on the device no longer than their
    forward."""
    import copy

    from quantcal.export.reference import fake_quant_reference
    from quantcal.fakequant import fake_quant_modules, swapped
    from quantcal.models import load_model
    from tinymodels import build_tiny_model

    folder = tmp_path / "model"
    build_tiny_model(family).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    model, _ = load_model(str(folder), low_memory=True)
    whole, _ = load_model(str(folder))
    formats, qparams = _plan(whole)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        with swapped(whole, fake_quant_modules(whole, formats, qparams)):
            want = copy.deepcopy(whole).half().to("cuda")(ids.cuda(), use_cache=False).logits
        with fake_quant_reference(model, formats, qparams, dtype=torch.float16,
                                  device="cuda"):
            got = model(ids.cuda(), use_cache=False).logits
    assert got.device.type == "cuda" and torch.equal(got, want)
    assert {t.device.type for t in model.parameters()} <= {"cpu", "meta"}


@pytest.mark.parametrize("family", ["llama3", "qwen2", "gemma3", "gpt2"])
def test_streamed_lazy_export_is_the_whole_one(family, tmp_path, tiny_tokenizer):
    """Built from the blocks as they are read and written as it is built, the export is the
    same bytes as one built from the model in memory and saved whole, and verifies with
    the same figures."""
    import numpy as np

    from quantcal.export.builder import ExternalData, save_model
    from quantcal.export.graphs import build_decoder
    from quantcal.export.parity import check_parity
    from quantcal.models import load_model
    from tinymodels import build_tiny_model

    folder = tmp_path / "model"
    build_tiny_model(family).to(torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    whole, _ = load_model(str(folder))
    lazy, _ = load_model(str(folder), low_memory=True)
    formats, qparams = _plan(whole)
    a, b = tmp_path / "a" / "model.onnx", tmp_path / "b" / "model.onnx"
    save_model(build_decoder(whole, formats, qparams, np.float32).model(), a)
    b.parent.mkdir()
    with ExternalData(b) as data:
        built = build_decoder(lazy, formats, qparams, np.float32, data=data)
        save_model(built.model(), b, data=data)
    for suffix in ("", ".data"):
        assert (a.parent / (a.name + suffix)).read_bytes() == \
            (b.parent / (b.name + suffix)).read_bytes(), suffix
    assert not list(b.parent.glob(".*"))  # no partial file left
    figures = [check_parity(path, model, formats, qparams, provider="cpu", dtype=np.float32,
                            fused=built.fused) for path, model in ((a, whole), (b, lazy))]
    assert figures[0] == figures[1] and figures[1]["passed"] == 1.0
