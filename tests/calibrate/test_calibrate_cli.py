"""`quantcal calibrate` end to end on tiny models and real text, and every bad input:
one clear line, exit status 2, nothing written."""

from __future__ import annotations

import gzip
import json

import pytest
from click.testing import CliRunner

from quantcal.cli import cli
from quantcal.config import RunRecord
from quantcal.rundir import QPARAMS, RUN_JSON, STATS, RunDir


def _calibrate(model_dir, run, data, *extra):
    args = ["calibrate", "--model", str(model_dir), "--data", data, "--samples", "4",
            "--seq-len", "32", "--batch-size", "2", "--sensitivity-samples", "2",
            "--run", str(run), *extra]
    return CliRunner().invoke(cli, args)


def test_calibrate_writes_the_run_directory(tiny_model_dir, tmp_path, c4_file):
    run = tmp_path / "run"
    res = _calibrate(tiny_model_dir, run, c4_file, "--formats", "int8,int4-g32,w8a8")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == sorted(
        [RUN_JSON, STATS, QPARAMS, "sensitivity.json", "sensitivity.png", "plan.json"])
    record = RunDir(run).read_run()
    assert isinstance(record, RunRecord)
    assert record.config.samples == 4 and record.config.seq_len == 32
    kinds = {i.kind for i in record.layers.values()}
    assert "embedding" in kinds and ({"linear"} <= kinds or {"conv1d"} <= kinds)
    assert any(n.endswith("lm_head") for n in record.layers)
    qparams, meta = RunDir(run).load_tensors(QPARAMS, "qparams")
    assert meta["formats"] == "int8,int4-g32,w8a8"
    assert any(k.endswith("/act/scale") for k in qparams)
    (emb,) = [n for n, i in record.layers.items() if i.kind == "embedding"]  # not GPT-2's wpe
    vocab, hidden = record.layers[emb].out_features, record.layers[emb].in_features
    assert qparams[f"{emb}/int4-g32/scale"].shape == (vocab, hidden // 32)  # groups along H
    assert qparams[f"{emb}/int8/zero"].shape == (vocab, -(-hidden // 128))
    assert not any(k.startswith(f"{emb}/w8a8/") or k.startswith(f"{emb}/act/") for k in qparams)
    assert {"load_s", "stats_s", "qparams_s", "tokens_per_s"} <= set(record.timings)


def test_rerun_same_config_ok_different_needs_overwrite(tiny_llama_dir, tmp_path, c4_file):
    run = tmp_path / "run"
    assert _calibrate(tiny_llama_dir, run, c4_file).exit_code == 0
    (run / "model.onnx").write_text("stale")  # a downstream file of that run
    assert _calibrate(tiny_llama_dir, run, c4_file).exit_code == 0
    res = _calibrate(tiny_llama_dir, run, c4_file, "--seed", "5")
    assert res.exit_code == 2 and "already holds a different run" in res.output
    assert "seed" in res.output and "--overwrite" in res.output
    res = _calibrate(tiny_llama_dir, run, c4_file, "--seed", "5", "--overwrite")
    assert res.exit_code == 0, res.output
    assert RunDir(run).read_run().config.seed == 5
    assert not (run / "model.onnx").exists()  # stale downstream files are removed
    assert RunDir(run).read_plan().model == str(tiny_llama_dir)  # a fresh plan


def _bad_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n\n")
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08\x00garbage")
    fields = tmp_path / "fields.jsonl"
    fields.write_text(json.dumps({"body": "hello world " * 50}) + "\n")
    return empty, corrupt, fields


@pytest.mark.parametrize("case", ["missing model", "unknown data", "empty file", "corrupt file",
                                  "wrong field", "seq too long", "no samples", "too many samples",
                                  "missing data file", "bad format"])
def test_bad_input_is_one_clear_line(case, tmp_path, c4_file, tiny_llama_dir):
    empty, corrupt, fields = _bad_files(tmp_path)
    run = tmp_path / "run"
    model = str(tiny_llama_dir)
    args = {
        "missing model": (["--model", str(tmp_path / "no-such-model")], "not found"),
        "unknown data": (["--data", "c5"], "c4"),
        "empty file": (["--data", str(empty)], "empty"),
        "corrupt file": (["--data", str(corrupt)], "corrupt"),
        "wrong field": (["--data", str(fields)], "--text-field"),
        "seq too long": (["--seq-len", "100000"], "longer than the model allows"),
        "no samples": (["--samples", "0"], "--samples"),
        "too many samples": (["--samples", "100000"], "windows"),
        "missing data file": (["--data", str(tmp_path / "nope.jsonl")], "not"),
        "bad format": (["--formats", "int4-g100"], "group size"),
    }[case]
    base = {"--model": model, "--data": c4_file, "--samples": "4", "--seq-len": "32"}
    flags, expect = args
    for key, value in zip(flags[::2], flags[1::2]):
        base[key] = value
    argv = ["calibrate", "--run", str(run)] + [x for kv in base.items() for x in kv]
    res = CliRunner().invoke(cli, argv)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("quantcal: error")]
    assert len(lines) == 1 and expect.lower() in lines[0].lower(), res.output
    assert "Traceback" not in res.output
    assert not run.exists()


def test_interrupt_keeps_finished_steps_and_resumes(tmp_path, c4_file, tiny_llama_dir,
                                                    monkeypatch):
    """Ctrl-C during qparams: nothing is committed (no run.json, stats or qparams in the run
    directory), the statistics are checkpointed, and the same command resumes from them."""
    import quantcal.calibrate.api as api

    real_qparams, real_collect = api.compute_qparams, api.collect_full
    calls = {"collect": 0}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def counted(*args, **kwargs):
        calls["collect"] += 1
        return real_collect(*args, **kwargs)

    monkeypatch.setattr(api, "compute_qparams", interrupted)
    monkeypatch.setattr(api, "collect_full", counted)
    run = tmp_path / "run"
    res = _calibrate(tiny_llama_dir, run, c4_file)
    assert res.exit_code == 130 and "interrupted" in res.output
    assert "resume" in res.output and "stats" in res.output, res.output
    assert not [p for p in run.iterdir() if not p.name.startswith(".")]
    assert calls["collect"] == 1

    monkeypatch.setattr(api, "compute_qparams", real_qparams)
    res = _calibrate(tiny_llama_dir, run, c4_file)
    assert res.exit_code == 0, res.output
    assert calls["collect"] == 1  # the statistics came from the checkpoint
    assert RunDir(run).has(RUN_JSON) and not (run / ".staging").exists()


def test_interrupt_before_any_step_leaves_nothing(tmp_path, c4_file, tiny_llama_dir,
                                                  monkeypatch):
    import quantcal.calibrate.api as api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "collect_full", interrupted)
    run = tmp_path / "run"
    res = _calibrate(tiny_llama_dir, run, c4_file)
    assert res.exit_code == 130 and "interrupted" in res.output
    assert not run.exists()
