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
def planned_run(tmp_path_factory, tiny_llama_dir, c4_file):
    run = tmp_path_factory.mktemp("planned") / "run"
    res = CliRunner().invoke(cli, [
        "calibrate", "--model", str(tiny_llama_dir), "--data",
        c4_file, "--samples", "4", "--seq-len",
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


def test_plan_kl_is_measured_on_windows_that_scored_nothing(planned_run, tiny_llama_dir):
    """Scoring takes the first --sensitivity-samples held-out windows, the measurement as
    many others: kl_measured equals the whole-plan KL on those (an independent recompute),
    not on the windows the plan was optimised on."""
    import torch

    from quantcal.calibrate.data import load_calibration_data
    from quantcal.calibrate.plans import plan_kl
    from quantcal.calibrate.qparams import QPARAMS_KIND
    from quantcal.models import load_model
    from quantcal.rundir import QPARAMS

    sens = read_record(planned_run.file(SENSITIVITY), SensitivityRecord)
    plan, cfg = planned_run.read_plan(), planned_run.read_run().config
    model, tok = load_model(str(tiny_llama_dir), dtype=torch.float32, device="cpu")
    calib, held = load_calibration_data(cfg.data, tok, seq_len=cfg.seq_len, samples=cfg.samples,
                                        seed=cfg.seed, holdout=6)
    assert not any(bool((calib == w).all(-1).any()) for w in held)  # none calibrated
    qparams, _ = planned_run.load_tensors(QPARAMS, QPARAMS_KIND)
    kl = {part: plan_kl(model, plan, qparams, windows, batch_size=3, device=torch.device("cpu"))
          for part, windows in (("scored", held[:3]), ("apart", held[3:]))}
    assert plan.kl_measured == pytest.approx(kl["apart"], rel=1e-5)
    assert abs(kl["scored"] - kl["apart"]) > 1e-4 * kl["apart"]
    assert (sens.samples, sens.measure_samples) == (3, 3)  # both counts recorded
    assert (plan.score_windows, plan.measure_windows) == (3, 3)


def test_proxy_rank_agreement_is_per_format(planned_run):
    """sensitivity.json holds the Fisher proxy's Spearman per format across layers (the
    pooled figure, which "int4 hurts more than int8" inflates, only labelled as pooled),
    equal to scipy's on the stored scores; the report shows both."""
    from scipy.stats import spearmanr

    sens = read_record(planned_run.file(SENSITIVITY), SensitivityRecord)
    assert set(sens.spearman_per_format) == {"int8", "int4-g64", "int4-g32"}
    for fmt, rho in sens.spearman_per_format.items():
        names = list(sens.scores)
        ref = spearmanr([sens.scores[n][fmt] for n in names],
                        [sens.proxy[n][fmt] for n in names]).statistic
        assert rho == pytest.approx(float(ref), abs=1e-12), fmt
    res = CliRunner().invoke(cli, ["report", "--run", str(planned_run.path)])
    assert res.exit_code == 0, res.output
    text = planned_run.file("report.md").read_text()
    for fmt, rho in sens.spearman_per_format.items():
        assert f"| {fmt} | {rho:.3f} |" in text
    assert f"| pooled over formats (inflated by format alone) | {sens.spearman:.3f} |" in text


def test_fast_sensitivity_is_labelled_a_proxy(tiny_llama_dir, c4_file, tmp_path):
    """--sensitivity fast says what it runs (a forward and a backward pass), and neither
    the summary line nor the report calls its score a KL."""
    help_text = " ".join(CliRunner().invoke(cli, ["calibrate", "--help"]).output.split())
    assert "no forward passes" not in help_text
    assert "one forward and one backward pass" in help_text
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, [
        "calibrate", "--model", str(tiny_llama_dir), "--data",
        c4_file, "--samples", "4", "--seq-len",
        "32", "--batch-size", "3", "--sensitivity-samples", "2", "--formats", "int8,int4-g32",
        "--sensitivity", "fast", "--target-bits", "10", "--run", str(run)])
    assert res.exit_code == 0, res.output
    summary = res.output.strip().splitlines()[-1]
    assert "proxy score" in summary and "(Fisher, not KL)" in summary
    assert "KL predicted" not in summary and "KL measured" in summary
    plan = RunDir(run).read_plan()
    assert plan.predicted_by == "fast" and plan.measure_windows == 2
    assert CliRunner().invoke(cli, ["report", "--run", str(run)]).exit_code == 0
    text = (run / "report.md").read_text()
    assert "proxy score (Fisher, not KL)" in text and "Whole-model KL" not in text


def test_plan_measures_in_a_new_shell_without_the_data_folder(tmp_path, tiny_llama_dir,
                                                              sample_data, c4_file, monkeypatch):
    """Calibrated on a named set from $QUANTCAL_DATA_DIR; in a new shell without it,
    `quantcal plan` re-measures from the source run.json recorded, and `--data` names
    another source when the recorded one is gone."""
    run = tmp_path / "run"
    monkeypatch.setenv("QUANTCAL_DATA_DIR", str(sample_data))
    res = CliRunner().invoke(cli, [
        "calibrate", "--model", str(tiny_llama_dir), "--data", "c4", "--samples", "4",
        "--seq-len", "32", "--batch-size", "2", "--sensitivity-samples", "2", "--formats",
        "int8,int4-g32", "--target-bits", "10", "--run", str(run)])
    assert res.exit_code == 0, res.output
    monkeypatch.delenv("QUANTCAL_DATA_DIR")
    res = CliRunner().invoke(cli, ["plan", "--run", str(run), "--target-bits", "8"])
    assert res.exit_code == 0, res.output
    assert RunDir(run).read_plan().kl_measured is not None
    res = CliRunner().invoke(cli, ["plan", "--run", str(run), "--target-bits", "9", "--data",
                                   c4_file])
    assert res.exit_code == 0, res.output
