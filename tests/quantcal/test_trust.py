"""The run directory cannot lie: what was seen going wrong, reproduced end to end.

Each test is one class of failure found by trying quantcal as a hostile user would: a failed
export replacing the verified one, files from different runs mixed, weights changed after
calibration, two writers at once, OS faults mid-write, an export written elsewhere
rewriting the run's record. Every refusal is one line and exit status 2, with the run
directory's files unchanged.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from quantcal.cli import cli
from quantcal.config import Plan, RunRecord
from quantcal.rundir import (
    EXPORT_JSON, MODEL, PLAN, QPARAMS, RUN_JSON, RunDir, atomic_write_json, load_tensors,
    read_record, save_tensors,
)
from quantcal.txn import RunLock


def _invoke(args):
    return CliRunner().invoke(cli, args)


def _ok(args):
    res = _invoke(args)
    assert res.exit_code == 0, res.output
    return res


def _one_line_error(res, *words):
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("quantcal: error:")]
    assert len(errors) == 1, res.output
    assert "Traceback" not in res.output
    for w in words:
        assert w.lower() in errors[0].lower(), errors[0]
    return errors[0]


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_llama_dir, c4_file):
    """A model folder of its own (tests change its weights), calibrated and exported."""
    root = tmp_path_factory.mktemp("trust")
    model = root / "model"
    shutil.copytree(tiny_llama_dir, model)
    run = root / "run"
    _ok(["calibrate", "--model", str(model), "--data",
         c4_file, "--samples", "4",
         "--seq-len", "32", "--batch-size", "2", "--sensitivity-samples", "2",
         "--formats", "int8,int4-g32", "--target-bits", "8", "--device", "cpu",
         "--run", str(run)])
    _ok(["export", "--provider", "cpu", "--run", str(run)])
    return root


@pytest.fixture
def case(base, tmp_path):
    """A private copy of the calibrated run and of its model (run.json repointed)."""
    shutil.copytree(base / "model", tmp_path / "model")
    shutil.copytree(base / "run", tmp_path / "run")
    run = RunDir(tmp_path / "run")
    record = run.read_run()
    cfg = record.config.__class__(**{**record.config.__dict__, "model": str(tmp_path / "model")})
    atomic_write_json(run.file(RUN_JSON), record.__class__(**{**record.__dict__, "config": cfg}))
    return tmp_path


def _qparams_nan_but_recorded(run: RunDir) -> None:
    """A NaN in one scale, with run.json and plan.json updated as if calibration made it
    (a calibration bug rather than tampering, so provenance alone cannot catch it)."""
    from quantcal.provenance import sha256_file

    tensors, meta = load_tensors(run.file(QPARAMS), "qparams")
    key = next(k for k in tensors if k.endswith("scale") and "int8" in k and "layers.0" in k)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_tensors(run.file(QPARAMS), tensors, kind="qparams", metadata=meta)
    digest = sha256_file(run.file(QPARAMS))
    record = run.read_run()
    atomic_write_json(run.file(RUN_JSON), record.__class__(
        **{**record.__dict__, "files": {**record.files, QPARAMS: digest}}))
    plan = run.read_plan()
    atomic_write_json(run.file(PLAN), Plan(**{**plan.__dict__, "made_from": {QPARAMS: digest}}))


def test_failed_export_keeps_the_verified_one(case):
    run = RunDir(case / "run")
    before = {k: v for k, v in _digests(run.path).items()
              if k in (MODEL, MODEL + ".data", EXPORT_JSON)}
    _qparams_nan_but_recorded(run)
    line = _one_line_error(_invoke(["export", "--provider", "cpu", "--run", str(run.path)]),
                           "does not match torch", "was not replaced")
    after = {k: v for k, v in _digests(run.path).items() if k in before}
    assert after == before  # the verified export is untouched
    failed = run.path / ".failed-export"
    assert (failed / EXPORT_JSON).is_file(), line
    text = (failed / EXPORT_JSON).read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in export.json"))
    assert json.loads(text)["passed"] is False
    # the consumers still run on the verified model
    _ok(["generate", "--run", str(run.path), "--prompt", "The", "--max-new-tokens", "4",
         "--provider", "cpu"])


def test_consumers_refuse_an_unverified_or_changed_export(case):
    run = RunDir(case / "run")
    gen = ["generate", "--run", str(run.path), "--prompt", "The", "--max-new-tokens", "2",
           "--provider", "cpu"]
    bench = ["bench", "--run", str(run.path), "--provider", "cpu", "--prompt-len", "8",
             "--new-tokens", "2"]
    evaluate = ["eval", "--run", str(run.path), "--tasks", "wikitext2", "--limit", "1",
                "--provider", "cpu"]
    record = json.loads(run.file(EXPORT_JSON).read_text())
    run.file(EXPORT_JSON).write_text(json.dumps({**record, "passed": False}))
    for args in (gen, bench, evaluate):
        _one_line_error(_invoke(args), "failed its checks")
    run.file(EXPORT_JSON).unlink()
    for args in (gen, bench, evaluate):
        _one_line_error(_invoke(args), "no export record")
    run.file(EXPORT_JSON).write_text(json.dumps(record))
    with open(run.file(MODEL + ".data"), "r+b") as f:  # one byte of the weights changed
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    for args in (gen, bench, evaluate):
        _one_line_error(_invoke(args), "changed after the export")


def test_weights_changed_after_calibration_are_refused(case):
    from safetensors.torch import load_file, save_file

    run = RunDir(case / "run")
    weights = case / "model" / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, str(weights), metadata={"format": "pt"})
    before = _digests(run.path)
    _one_line_error(_invoke(["export", "--provider", "cpu", "--run", str(run.path)]),
                    "not the one", "model.safetensors")
    _one_line_error(_invoke(["plan", "--run", str(run.path), "--target-bits", "6"]),
                    "not the one")
    assert _digests(run.path) == before


def test_files_of_different_runs_are_refused(case, base, tiny_llama_dir, c4_file):
    """A plan from another calibration, and run.json beside another run's qparams."""
    run = RunDir(case / "run")
    other = case / "other"
    _ok(["calibrate", "--model", str(case / "model"), "--data",
         c4_file, "--samples", "4",
         "--seq-len", "32", "--batch-size", "2", "--sensitivity-samples", "2", "--seed", "7",
         "--formats", "int8,int4-g32", "--target-bits", "8", "--device", "cpu",
         "--run", str(other)])
    before = _digests(run.path)
    _one_line_error(_invoke(["export", "--provider", "cpu", "--run", str(run.path),
                             "--plan", str(other / PLAN)]), "plan", "another")
    assert _digests(run.path) == before
    shutil.copy(other / QPARAMS, run.file(QPARAMS))  # the mixed directory a kill once left
    mixed = _digests(run.path)
    for args in (["export", "--provider", "cpu"], ["plan", "--target-bits", "6"], ["report"]):
        _one_line_error(_invoke([*args, "--run", str(run.path)]), "re-run")
    assert _digests(run.path) == mixed


def test_report_refuses_a_plan_changed_after_export_and_a_stale_eval(case, sample_data):
    run = RunDir(case / "run")
    _ok(["eval", "--run", str(run.path), "--tasks", "wikitext2", "--limit", "1",
         "--seq-len", "32", "--provider", "cpu", "--data-dir", str(sample_data)])
    _ok(["report", "--run", str(run.path)])
    _ok(["plan", "--run", str(run.path), "--target-bits", "5", "--no-measure"])
    _one_line_error(_invoke(["report", "--run", str(run.path)]), "changed after")
    _ok(["export", "--provider", "cpu", "--run", str(run.path)])
    _one_line_error(_invoke(["report", "--run", str(run.path)]), "earlier export")
    _ok(["eval", "--run", str(run.path), "--tasks", "wikitext2", "--limit", "1",
         "--seq-len", "32", "--provider", "cpu", "--data-dir", str(sample_data)])
    _ok(["report", "--run", str(run.path)])


def test_a_second_writer_gets_one_line(case):
    run = RunDir(case / "run")
    before = _digests(run.path)
    with RunLock(run.path, "calibrate"):
        for args in (["export", "--provider", "cpu"], ["plan", "--target-bits", "6",
                                                        "--no-measure"], ["report"]):
            _one_line_error(_invoke([*args, "--run", str(run.path)]), "in use by",
                            "quantcal calibrate")
    assert _digests(run.path) == before


def test_a_second_calibrate_is_refused(case):
    run = RunDir(case / "run")
    record = run.read_run()
    before = _digests(run.path)
    with RunLock(run.path, "calibrate"):
        cfg = record.config
        res = _invoke(["calibrate", "--model", cfg.model, "--data", cfg.data, "--samples", "4",
                       "--seq-len", "32", "--batch-size", "2", "--sensitivity-samples", "2",
                       "--formats", "int8,int4-g32", "--target-bits", "8", "--device", "cpu",
                       "--run", str(run.path)])
        _one_line_error(res, "in use by")
    assert _digests(run.path) == before


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
@pytest.mark.parametrize("stage", ["calibrate", "export", "plan", "eval", "report",
                                   "export-elsewhere"])
def test_os_faults_are_one_line_and_keep_the_files(case, monkeypatch, stage, code,
                                                    sample_data):
    run = RunDir(case / "run")
    cfg = run.read_run().config
    args = {"calibrate": ["calibrate", "--model", cfg.model, "--data", cfg.data, "--samples",
                          "4", "--seq-len", "32", "--batch-size", "2", "--sensitivity-samples",
                          "2", "--formats", "int8,int4-g32", "--target-bits", "8", "--seed",
                          "3", "--overwrite", "--device", "cpu"],
            "export": ["export", "--provider", "cpu"],
            "export-elsewhere": ["export", "--provider", "cpu", "-o",
                                 str(case / "out" / "m.onnx")],
            "plan": ["plan", "--target-bits", "6", "--no-measure"],
            "eval": ["eval", "--tasks", "wikitext2", "--limit", "1", "--seq-len", "32",
                     "--provider", "cpu", "--data-dir", str(sample_data)],
            "report": ["report"]}[stage]
    before = _digests(run.path)
    real = os.replace

    def failing(src, dst, *a, **k):
        if str(dst).startswith(str(case)):
            raise OSError(code, os.strerror(code), str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", failing)
    line = _one_line_error(_invoke([*args, "--run", str(run.path)]), os.strerror(code))
    assert "keeps its previous files" in line
    monkeypatch.setattr(os, "replace", real)
    assert _digests(run.path) == before


def test_export_elsewhere_keeps_the_runs_record(case):
    run = RunDir(case / "run")
    before = _digests(run.path)
    out = case / "out" / "model.onnx"
    _ok(["plan", "--run", str(run.path), "--target-bits", "5", "--no-measure", "-o",
         str(case / "p5.json")])
    _ok(["export", "--provider", "cpu", "--run", str(run.path), "--plan",
         str(case / "p5.json"), "-o", str(out)])
    assert _digests(run.path) == before  # neither the run's model nor its export.json
    own = read_record(out.parent / EXPORT_JSON, __import__(
        "quantcal.provenance", fromlist=["ExportRecord"]).ExportRecord)
    assert own.passed and own.path == "model.onnx"
    _ok(["generate", "--run", str(run.path), "--model", str(out), "--prompt", "The",
         "--max-new-tokens", "2", "--provider", "cpu"])
    named = case / "out" / "small.onnx"
    _ok(["export", "--provider", "cpu", "--run", str(run.path), "--plan",
         str(case / "p5.json"), "-o", str(named)])
    assert (case / "out" / "small.export.json").is_file()
    assert _digests(run.path) == before


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_a_real_process_killed_during_verification(case, sig):
    """A separate `quantcal export` process killed (kill -9, or kill) while it verifies
    the new model: the run keeps the old verified export, and the next command reads it."""
    import signal
    import subprocess
    import sys
    import time

    run = RunDir(case / "run")
    _ok(["plan", "--run", str(run.path), "--target-bits", "5", "--no-measure"])
    before = {k: v for k, v in _digests(run.path).items()
              if k in (MODEL, MODEL + ".data", EXPORT_JSON)}
    staged = run.path / ".staging" / "export-model" / MODEL
    proc = subprocess.Popen([sys.executable, "-m", "quantcal.cli", "export", "--provider",
                             "cpu", "--run", str(run.path)], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not staged.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "export ended before it could be killed"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    if sig == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130, err
        assert "interrupted" in err and "not committed" in err, err
    after = {k: v for k, v in _digests(run.path).items() if k in before}
    assert after == before
    _ok(["generate", "--run", str(run.path), "--prompt", "The", "--max-new-tokens", "2",
         "--provider", "cpu"])
