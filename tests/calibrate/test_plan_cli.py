"""`quantcal calibrate` with sensitivity and a plan, `quantcal plan` re-planning, plan files
that round-trip and hand edits that validate (or are rejected clearly)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from quantcal.cli import cli
from quantcal.config import Plan, SensitivityRecord
from quantcal.errors import QuantcalError
from quantcal.plancheck import resolved_formats
from quantcal.rundir import PLAN, SENSITIVITY, RunDir, read_record


@pytest.fixture(scope="module")
def planned_run(tmp_path_factory, tiny_llama_dir, shared_data):
    run = tmp_path_factory.mktemp("planned") / "run"
    res = CliRunner().invoke(cli, [
        "calibrate", "--model", str(tiny_llama_dir), "--data",
        str(shared_data / "c4" / "c4_validation_2k.jsonl.gz"), "--samples", "4", "--seq-len",
        "32", "--batch-size", "3", "--sensitivity-samples", "3", "--formats",
        "int8,int4-g64,int4-g32", "--target-bits", "10", "--keep", "lm_head", "--run", str(run)])
    assert res.exit_code == 0, res.output
    assert "plan (target_bits 10)" in res.output
    return RunDir(run)


def test_calibrate_writes_sensitivity_and_plan(planned_run):
    for name in ("sensitivity.json", "sensitivity.png", "plan.json"):
        assert planned_run.has(name), name
    sens = read_record(planned_run.file(SENSITIVITY), SensitivityRecord)
    assert sens.method == "exact" and sens.samples == 3 and sens.spearman is not None
    assert len(sens.scores) == 15 and sens.proxy.keys() == sens.scores.keys()
    plan = planned_run.read_plan()
    assert plan.layers["lm_head"].format.name == "fp16"
    assert plan.layers["lm_head"].reason.startswith("rule: --keep")
    assert plan.totals["bits_per_weight"] <= 10.0
    assert plan.kl_measured is not None and plan.kl_predicted is not None
    assert planned_run.file("sensitivity.png").read_bytes()[:4] == b"\x89PNG"


def test_plan_round_trips_and_replans(planned_run, tmp_path):
    plan = planned_run.read_plan()
    assert Plan.from_dict(json.loads(planned_run.file(PLAN).read_text())) == plan
    out = tmp_path / "plan9.json"
    res = CliRunner().invoke(cli, ["plan", "--run", str(planned_run.path), "--target-bits",
                                   "8.5", "--no-measure", "-o", str(out)])
    assert res.exit_code == 0, res.output
    plan9 = planned_run.read_plan(out)
    assert plan9.totals["bits_per_weight"] <= 8.5
    assert plan9.kl_predicted >= plan.kl_predicted  # fewer bits, at least as much damage
    assert plan9.kl_measured is None and planned_run.read_plan() == plan  # -o: run's plan kept


@pytest.mark.parametrize("args, words", [
    (["--target-bits", "2"], "feasible range"),
    (["--target-bits", "17"], "feasible range"),
    (["--max-size", "1KB"], "feasible range"),
    (["--target-bits", "9", "--max-kl", "1"], "give one budget"),
    (["--keep", "nothing.matches"], "matches no layer"),
    (["--force", "*=int4-g128"], "no int4-g128 qparams"),
    (["--keep", "lm_head", "--force", "lm_head=int8"], "conflicting rules"),
    (["--force", "model.embed_tokens=w8a8"], "is an embedding, which takes fp16, int8 or int4"),
    (["--force", "model.embed_tokens=int4-g128"], "no int4-g128 qparams"),
])
def test_impossible_budgets_and_rules(planned_run, args, words):
    res = CliRunner().invoke(cli, ["plan", "--run", str(planned_run.path), "--no-measure",
                                   *args])
    assert res.exit_code == 2 and words in res.output, res.output
    assert "Traceback" not in res.output


def test_edited_plan_validates_and_bad_edits_are_rejected(planned_run):
    record = planned_run.read_run()
    data = json.loads(planned_run.file(PLAN).read_text())
    name = "model.layers.0.mlp.down_proj"
    data["layers"][name]["format"] = "int4-g32"
    del data["layers"]["model.layers.1.self_attn.q_proj"]  # dropped: stays fp16
    formats = resolved_formats(Plan.from_dict(data), record, ["int8", "int4-g64", "int4-g32"])
    assert formats[name].name == "int4-g32"
    assert formats["model.layers.1.self_attn.q_proj"].name == "fp16"
    bad = json.loads(json.dumps(data))
    bad["layers"]["model.layers.9.mlp.up_proj"] = bad["layers"][name]
    with pytest.raises(QuantcalError, match="does not have"):
        resolved_formats(Plan.from_dict(bad), record, ["int4-g32"])
    bad = json.loads(json.dumps(data))
    bad["layers"][name]["format"] = "int4-g128"
    with pytest.raises(QuantcalError, match="no int4-g128 qparams"):
        resolved_formats(Plan.from_dict(bad), record, ["int8", "int4-g64", "int4-g32"])
    bad["layers"][name]["format"] = "int5"
    with pytest.raises(QuantcalError, match="unknown format"):
        Plan.from_dict(bad)
    # a hand-written embedding entry: a block format validates, w8a8 does not
    emb = dict(data["layers"][name], format="int8", reason="user")
    edited = json.loads(json.dumps(data))
    edited["layers"]["model.embed_tokens"] = emb
    formats = resolved_formats(Plan.from_dict(edited), record, ["int8", "int4-g64", "int4-g32"])
    assert formats["model.embed_tokens"].name == "int8"
    edited["layers"]["model.embed_tokens"]["format"] = "w8a8"
    with pytest.raises(QuantcalError, match="an embedding takes fp16, int8 or int4-gN"):
        resolved_formats(Plan.from_dict(edited), record, ["int8", "w8a8"])


def test_force_puts_the_embedding_in_the_plan(planned_run, tmp_path):
    """The budget never quantizes the embedding (no score); --force does, with its bytes
    in place of the fp16 table's, and the measured KL covers it."""
    emb = "model.embed_tokens"
    assert emb not in planned_run.read_plan().layers
    record = planned_run.read_run()
    out = tmp_path / "emb.json"
    res = CliRunner().invoke(cli, ["plan", "--run", str(planned_run.path), "--target-bits", "10",
                                   "--keep", "lm_head", "--force", f"{emb}=int4-g32", "-o",
                                   str(out)])
    assert res.exit_code == 0, res.output
    plan = planned_run.read_plan(out)
    entry = plan.layers[emb]
    assert entry.format.name == "int4-g32" and entry.score is None
    assert entry.reason == f"rule: --force {emb}=int4-g32"
    assert entry.bytes == entry.format.embedding_bytes(512, 64)
    table = 2 * 512 * 64  # the untied head is planned; the fp16 table was in other_param_bytes
    assert plan.predicted_size_bytes == (sum(p.bytes for p in plan.layers.values())
                                         + record.other_param_bytes - table)
    assert plan.kl_measured is not None and plan.kl_measured > 0
    assert resolved_formats(plan, record, ["int8", "int4-g64", "int4-g32"])[emb] == entry.format


def test_planner_equals_brute_force_on_the_tiny_models_scores(planned_run):
    """The tiny Llama's measured scores, six layers free: the plan is the brute-force best."""
    import itertools

    from quantcal.calibrate.planner import solve
    from quantcal.calibrate.plans import candidates

    sens = read_record(planned_run.file(SENSITIVITY), SensitivityRecord)
    cands = dict(list(candidates(planned_run.read_run(), sens).items())[:6])
    lo = sum(min(c.nbytes for c in cs) for cs in cands.values())
    hi = sum(max(c.nbytes for c in cs) for cs in cands.values())
    for frac in (0.1, 0.35, 0.6, 0.9):
        budget = int(lo + frac * (hi - lo))
        chosen = solve(cands, max_bytes=budget)
        best = min(sum(c.score for c in combo) for combo in itertools.product(*cands.values())
                   if sum(c.nbytes for c in combo) <= budget)
        assert sum(c.nbytes for c in chosen.values()) <= budget
        assert sum(c.score for c in chosen.values()) == pytest.approx(best, rel=1e-9, abs=1e-15)


def test_report_shows_plan_and_sensitivity(planned_run):
    res = CliRunner().invoke(cli, ["report", "--run", str(planned_run.path)])
    assert res.exit_code == 0, res.output
    text = planned_run.file("report.md").read_text()
    assert "![sensitivity](sensitivity.png)" in text and "## Plan" in text
    assert "lm_head" in text  # kept by a rule, listed


def test_report_without_a_run_is_one_line(tmp_path):
    res = CliRunner().invoke(cli, ["report", "--run", str(tmp_path / "none")])
    assert res.exit_code == 2 and "quantcal calibrate" in res.output
