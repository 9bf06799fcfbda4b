"""`quantcal plan` with a latency table: predicted decode tok/s in plan.json and the plan line,
`--min-tok-s` met or refused in one line, `--prefer-fusable` fusing more groups for at most
TOL more KL, `--latency-table` read or refused in one line."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from quantcal.cli import cli
from quantcal.latency import default_table
from quantcal.rundir import RunDir


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama_dir, c4_file) -> RunDir:
    out = tmp_path_factory.mktemp("speed") / "run"
    res = CliRunner().invoke(cli, [
        "calibrate", "--model", str(tiny_llama_dir), "--data", c4_file, "--samples", "4",
        "--seq-len", "32", "--batch-size", "3", "--sensitivity-samples", "3", "--formats",
        "int8,int4-g32", "--target-bits", "8", "--device", "cpu", "--run", str(out)])
    assert res.exit_code == 0, res.output
    assert "predicted decode" in res.output and "tok/s at batch 1" in res.output
    return RunDir(out)


def _plan(run: RunDir, tmp_path, *args: str):
    out = tmp_path / "plan.json"
    res = CliRunner().invoke(cli, ["plan", "--run", str(run.path), "--no-measure",
                                   "--target-bits", "8", "-o", str(out), *args])
    assert res.exit_code == 0, res.output
    return run.read_plan(out), res.output


def test_plan_json_has_the_predicted_speed(run):
    plan = run.read_plan()
    assert plan.predicted_tok_s == pytest.approx(1e6 / plan.speed.step_us)
    assert plan.speed.blocks == 2 and plan.speed.groups == 2  # q/k/v per block
    assert plan.speed.table.startswith(default_table().describe())
    layers = [p.latency_us for n, p in plan.layers.items() if n != "model.embed_tokens"]
    assert sum(layers) == pytest.approx(plan.speed.layers_us, abs=1e-3)  # 4 decimals each
    assert plan.speed.overhead_us == pytest.approx(2 * default_table().block_overhead_us)


def test_min_tok_s_is_met_or_refused_in_one_line(run, tmp_path):
    base, _ = _plan(run, tmp_path)
    plan, out = _plan(run, tmp_path, "--min-tok-s", f"{base.predicted_tok_s:.3f}")
    assert plan.predicted_tok_s >= round(base.predicted_tok_s, 3)
    assert plan.speed.min_tok_s == round(base.predicted_tok_s, 3)
    for goal, words in (("1e9", "blocks' overhead alone"), ("20000", "fastest plan predicts")):
        res = CliRunner().invoke(cli, ["plan", "--run", str(run.path), "--no-measure",
                                       "--target-bits", "8", "--min-tok-s", goal])
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert res.exit_code == 2 and len(lines) == 1, res.output
        assert lines[0].startswith(f"quantcal: error: --min-tok-s {float(goal):g} cannot be "
                                   "met") and words in lines[0]


def test_prefer_fusable_fuses_more_within_tol(run, tmp_path):
    base, _ = _plan(run, tmp_path)
    same, _ = _plan(run, tmp_path, "--prefer-fusable", "0")
    assert same.kl_predicted == pytest.approx(base.kl_predicted, rel=1e-9, abs=1e-12)
    assert same.speed.fused_groups >= base.speed.fused_groups
    loose, out = _plan(run, tmp_path, "--prefer-fusable", "1")
    assert loose.speed.fused_groups == loose.speed.groups == 2  # all int4 fits 8 bits
    assert loose.kl_predicted <= base.kl_predicted + 1 + 1e-9
    assert loose.speed.prefer_fusable == 1.0
    assert f"{loose.speed.fused_groups} of 2 q/k/v groups fused" in out


def test_latency_table_option(run, tmp_path):
    data = default_table().to_dict()
    data.update(device="Test GPU", block_overhead_us=1000.0, token_overhead_us=0.0)
    path = tmp_path / "table.json"
    path.write_text(json.dumps(data))
    base, _ = _plan(run, tmp_path)
    slow, out = _plan(run, tmp_path, "--latency-table", str(path))
    assert f"Test GPU (cuda, onnxruntime 1.31.1), {path}" in out
    # same formats, 2 blocks x 1000 us instead of the shipped overhead
    assert slow.speed.layers_us == pytest.approx(base.speed.layers_us)
    assert slow.speed.step_us == pytest.approx(base.speed.layers_us + 2000.0)
    path.write_text("{not json")
    res = CliRunner().invoke(cli, ["plan", "--run", str(run.path), "--no-measure",
                                   "--latency-table", str(path)])
    assert res.exit_code == 2 and "corrupted" in res.output and len(
        res.output.strip().splitlines()) == 1, res.output
