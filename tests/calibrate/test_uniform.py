"""The planner earns its place: a plan is measured against every uniform plan of its
candidate formats that is no larger, on the same held-out windows, and gives way to one that
measures better; plan.json records them all.

References here are computed independently: rival sizes from each format's own byte count,
rival KL from the HF model with fake-quant stand-ins and a KL written out in the test."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from quantcal.calibrate.planner import Rules
from quantcal.calibrate.uniform import MIXED, comparison, rivals, settle
from quantcal.cli import cli
from quantcal.config import Budget, CalibrateConfig, LayerInfo, RunRecord, SensitivityRecord
from quantcal.calibrate.plans import describe, make_plan
from quantcal.fakequant import fake_quant_modules, swapped
from quantcal.formats import FP16, Int4, Int8, parse_format
from quantcal.models import load_model
from quantcal.rundir import QPARAMS, RunDir

FORMATS = (Int8(), Int4(64), Int4(32))


def _record() -> RunRecord:
    shapes = {"a": (256, 256), "b": (256, 512), "c": (512, 256), "lm_head": (256, 1024)}
    layers = {n: LayerInfo("linear", k, n_out, 0 if n != "lm_head" else None)
              for n, (k, n_out) in shapes.items()}
    return RunRecord(config=CalibrateConfig(model="m", formats=FORMATS), layers=layers,
                     other_param_bytes=0, tied_lm_head=False)


def _sens(scores: dict[str, dict[str, float]]) -> SensitivityRecord:
    return SensitivityRecord("exact", FORMATS, scores)


def _bytes(record: RunRecord, fmt, names) -> int:
    return sum(fmt.weight_bytes(record.layers[n].out_features, record.layers[n].in_features)
               for n in names)


def test_rivals_are_the_uniform_plans_no_larger_than_the_plan():
    record = _record()
    # layer a hates int4; the rest do not care: the mixed plan keeps a in int8
    sens = _sens({n: {"int8": 0.001, "int4-g64": 1.0 if n == "a" else 0.01,
                      "int4-g32": 1.0 if n == "a" else 0.005} for n in record.layers})
    names = list(record.layers)
    budget = 8 * (_bytes(record, Int8(), ["a"]) + _bytes(record, Int4(32), names[1:])) / sum(
        record.layers[n].in_features * record.layers[n].out_features for n in names)
    plan = make_plan(record, sens, Budget("target_bits", budget), Rules())
    assert plan.layers["a"].format == Int8() and plan.layers["b"].format == Int4(32)
    got = rivals(record, sens, plan)
    # int8 everywhere is larger than the plan; both int4 plans are smaller
    assert set(got) == {"int4-g64", "int4-g32"}
    for name, rival in got.items():
        fmt = parse_format(name)
        assert {p.format for p in rival.layers.values()} == {fmt}
        assert rival.predicted_size_bytes == _bytes(record, fmt, names)
        assert rival.predicted_size_bytes <= plan.predicted_size_bytes
    # a pinned layer keeps its pin in every rival
    pinned = rivals(record, sens, plan, Rules(keep=("lm_head",)))
    assert all(r.layers["lm_head"].format == FP16() for r in pinned.values())


def test_settle_keeps_the_better_plan_and_records_every_rival():
    record = _record()
    layers = {n: make_plan(record, _sens({m: {f.name: 0.1 for f in FORMATS}
                                          for m in record.layers}),
                           Budget("target_bits", 16), Rules()).layers[n] for n in record.layers}
    plan = describe(record, layers, Budget("target_bits", 16))
    uniform = {f.name: describe(record, {n: layers[n].__class__(f) for n in layers},
                                Budget("target_bits", 16)) for f in FORMATS}
    measured = {f.name: kl for f, kl in zip(FORMATS, (0.2, 0.5, 0.3))}

    won = settle(plan.__class__(**{**plan.__dict__, "kl_measured": 0.1}), uniform, measured)
    assert won.choice == MIXED and won.kl_measured == 0.1
    assert {n: f["kl_measured"] for n, f in won.uniform.items()} == measured
    assert "best uniform plan no larger: int8" in comparison(won)
    assert "KL is 2.00x lower" in comparison(won)
    lost = settle(plan.__class__(**{**plan.__dict__, "kl_measured": 0.25}), uniform, measured)
    assert uniform["int8"].kl_measured is None  # the rivals given are left as they were
    assert lost.choice == "uniform int8" and lost.kl_measured == 0.2
    assert lost.uniform[MIXED]["kl_measured"] == 0.25
    assert "chose the uniform int8 plan" in comparison(lost)


@torch.inference_mode()
def _kl_by_hand(model, formats, qparams, windows) -> float:
    total = 0.0
    for w in windows:
        ref = torch.log_softmax(model(w[None]).logits.double(), -1)
        with swapped(model, fake_quant_modules(model, formats, qparams)):
            got = torch.log_softmax(model(w[None]).logits.double(), -1)
        total += float((ref.exp() * (ref - got)).sum(-1).mean())
    return total / len(windows)


def test_calibrate_measures_the_uniform_rivals(tmp_path, tiny_llama_dir, c4_file):
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, [
        "calibrate", "--model", str(tiny_llama_dir), "--data", c4_file, "--samples", "4",
        "--seq-len", "32", "--batch-size", "3", "--sensitivity-samples", "3", "--formats",
        "int8,int4-g64,int4-g32", "--target-bits", "6", "--run", str(run)])
    assert res.exit_code == 0, res.output
    plan = RunDir(run).read_plan()
    assert plan.uniform and all(k in ("int4-g64", "int4-g32", MIXED) for k in plan.uniform)
    rivals_kl = {n: f["kl_measured"] for n, f in plan.uniform.items() if n != MIXED}
    assert plan.kl_measured <= min(rivals_kl.values())  # never worse than a uniform rival
    assert ("best uniform plan no larger" in res.output) == (plan.choice == MIXED)
    # one rival's KL recomputed here: every linear layer in int4-g32, the embedding fp16
    from quantcal.calibrate.analysis import split_held_out
    from quantcal.calibrate.data import recorded_windows
    from quantcal.rundir import load_tensors

    record = RunDir(run).read_run()
    model, tok = load_model(str(tiny_llama_dir), dtype=torch.float32, device="cpu")
    _, held = recorded_windows(record, tok, holdout=2 * 3)
    qparams = load_tensors(run / QPARAMS, "qparams")[0]
    formats = {n: Int4(32) for n, i in record.layers.items() if i.kind != "embedding"}
    by_hand = _kl_by_hand(model, formats, qparams, split_held_out(held, 3)[1])
    assert rivals_kl["int4-g32"] == pytest.approx(by_hand, rel=1e-4, abs=1e-7)
    out = CliRunner().invoke(cli, ["report", "--run", str(run)])
    assert out.exit_code == 0, out.output
    text = (run / "report.md").read_text()
    assert "Against uniform plans no larger than it" in text
    for name in rivals_kl:
        assert f"| {name} |" in text
