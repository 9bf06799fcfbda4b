"""Fault injection: every writing stage killed (``os._exit``, as ``kill -9``: no cleanup
runs) or interrupted (Ctrl-C) at every point where it touches the file system, and the
run directory then holds the old committed set or the new one, never a mix.

A stage is first run once uninterrupted in a forked child that counts its fault points:
before and after every rename, before every delete and folder removal under the folders it
writes, in the middle of every safetensors and ONNX write (the file cut to half before the
kill), and before and after the export's verification. Then, for each point, a fresh copy of
the run directory is handed to a forked child that dies there. The parent then reads the
folder as the next quantcal command would (which first rolls forward a half-done commit),
and compares every file with the old and the new set (JSON compared without timings).
Every point is killed, every other one also interrupted; after every third, the same command
is run again on the faulted folder and must end in the new set (calibration resuming from
its checkpoint).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantcal.cli import cli
from quantcal.rundir import RunDir

VOLATILE = {"timings", "created", "seconds", "speed", "versions", "resources"}
CHILD_TIMEOUT_S = 300  # one faulted command; a child that hangs fails its case


def _ok(args):
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    return res


def _small_data(sample_data: Path, out: Path) -> Path:
    """A data folder laid out like shared/data with a few documents (fast to tokenize)."""
    import gzip

    with gzip.open(sample_data / "c4" / "c4_validation_2k.jsonl.gz", "rt") as f:
        lines = [next(f) for _ in range(60)]
    (out / "c4").mkdir(parents=True)
    (out / "c4" / "small.jsonl").write_text("".join(lines))
    (out / "wikitext2").mkdir()
    text = (sample_data / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    (out / "wikitext2" / "wiki.test.raw").write_text(text[:20000], encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_llama_dir, sample_data):
    """A calibrated and exported run of a tiny Llama (the 'old' set of every case)."""
    root = tmp_path_factory.mktemp("faults")
    run = root / "run"
    data = _small_data(sample_data, root / "data")
    _ok(["calibrate", "--model", str(tiny_llama_dir), "--data",
         str(data / "c4" / "small.jsonl"), "--samples", "4",
         "--seq-len", "32", "--batch-size", "2", "--sensitivity-samples", "2",
         "--formats", "int8,int4-g32", "--target-bits", "8", "--device", "cpu", "--run",
         str(run)])
    _ok(["export", "--provider", "cpu", "--run", str(run)])
    return {"run": run, "model": tiny_llama_dir, "data": data}


def _normal(path: Path) -> str:
    """A file's digest; JSON without the fields that differ between identical runs."""
    raw = path.read_bytes()
    if path.suffix == ".json":
        def strip(obj):
            if isinstance(obj, dict):
                return {k: strip(v) for k, v in obj.items() if k not in VOLATILE}
            if isinstance(obj, list):
                return [strip(v) for v in obj]
            return obj
        raw = json.dumps(strip(json.loads(raw)), sort_keys=True).encode()
    if path.suffix == ".png":
        return "png"  # matplotlib output is not byte-stable; its presence is compared
    if path.suffix == ".md":  # the report quotes measured speeds: compare what it covers
        return hashlib.sha256(b"".join(ln for ln in raw.splitlines(True)
                                       if not ln.startswith(b"| speed"))).hexdigest()
    return hashlib.sha256(raw).hexdigest()


def _snapshot(*folders: Path) -> dict[str, str]:
    """The committed files of ``folders`` as a reader sees them (after roll-forward)."""
    out = {}
    for folder in folders:
        RunDir(folder).recover()
        if folder.is_dir():
            out.update({f"{folder.name}/{p.name}": _normal(p) for p in sorted(folder.iterdir())
                        if p.is_file() and not p.name.startswith(".")})
    return out


class _Fault(Exception):
    pass


def _instrument(roots: list[Path], target: int | None, mode: str, counter: list[int]) -> None:
    """Install the fault points in this (child) process."""
    import safetensors.torch

    import quantcal.export.api as export_api
    import quantcal.rundir as rundir

    roots = [str(r.resolve()) for r in roots]

    def ours(path) -> bool:
        return any(os.path.abspath(str(path)).startswith(r) for r in roots)

    def point(cut: Path | None = None) -> None:
        counter[0] += 1
        if counter[0] != target:
            return
        if mode == "kill":
            if cut is not None and cut.exists():
                os.truncate(cut, cut.stat().st_size // 2)
            sys.stdout.flush()
            os._exit(137)
        raise KeyboardInterrupt

    def around(fn, before=True, after=True, when=lambda *a, **k: True):
        def wrapped(*args, **kwargs):
            hit = when(*args, **kwargs)
            if hit and before:
                point()
            out = fn(*args, **kwargs)
            if hit and after:
                point()
            return out
        return wrapped

    def cut_after(fn, path_arg):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            path = Path(args[path_arg])
            if ours(path):
                point(cut=path)
            return out
        return wrapped

    os.replace = around(os.replace, when=lambda src, dst, *a, **k: ours(dst))
    os.unlink = around(os.unlink, after=False, when=lambda p, *a, **k: ours(p))
    shutil.rmtree = around(shutil.rmtree, after=False, when=lambda p, *a, **k: ours(p))
    safetensors.torch.save_file = cut_after(safetensors.torch.save_file, 1)
    rundir.atomic_write_bytes = around(rundir.atomic_write_bytes, after=False,
                                       when=lambda p, *a, **k: ours(p))
    export_api.check_parity = around(export_api.check_parity)
    export_api.save_model = cut_after(export_api.save_model, 1)


def _run_child(args: list[str], roots: list[Path], target: int | None, mode: str
               ) -> tuple[int, int]:
    """Run the CLI in a forked child with faults installed; (exit status, points seen)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 1
        try:
            os.close(read)
            gc.disable()  # the parent's objects (matplotlib's among them) are not ours to free
            import torch

            torch.set_num_threads(1)
            counter = [0]
            _instrument(roots, target, mode, counter)
            res = CliRunner().invoke(cli, args)
            code = res.exit_code
            os.write(write, str(counter[0]).encode())
        finally:
            os._exit(code if isinstance(code, int) else 1)
    os.close(write)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read)
            pytest.fail(f"quantcal {' '.join(args)} hung for {CHILD_TIMEOUT_S} s")
        time.sleep(0.02)
    status = done[1]
    seen = os.read(read, 64).decode()
    os.close(read)
    return os.waitstatus_to_exitcode(status), int(seen or -1)


def _case(base_run, name: str, tmp: Path):
    """(command, folders it writes) on a fresh copy of the base run."""
    run = tmp / "run"
    shutil.copytree(base_run["run"], run)
    data = str(base_run["data"] / "c4" / "small.jsonl")
    calib = ["calibrate", "--model", str(base_run["model"]), "--data", data, "--samples", "4",
             "--seq-len", "32", "--batch-size", "2", "--sensitivity-samples", "2",
             "--formats", "int8,int4-g32", "--device", "cpu"]
    cases = {
        "calibrate-new": (calib + ["--target-bits", "8", "--run", str(tmp / "new")],
                          [tmp / "new"]),
        "calibrate-overwrite": (calib + ["--seed", "1", "--target-bits", "8", "--overwrite",
                                         "--run", str(run)], [run]),
        "plan": (["plan", "--run", str(run), "--target-bits", "5", "--no-measure"], [run]),
        "export": (["export", "--provider", "cpu", "--run", str(run)], [run]),
        "export-elsewhere": (["export", "--provider", "cpu", "--run", str(run), "-o",
                              str(tmp / "out" / "m.onnx")], [run, tmp / "out"]),
        "eval": (["eval", "--run", str(run), "--tasks", "wikitext2", "--limit", "1",
                  "--seq-len", "32", "--provider", "cpu", "--data-dir",
                  str(base_run["data"])], [run]),
        "report": (["report", "--run", str(run)], [run]),
    }
    if name == "report":  # something to report on
        _ok(cases["eval"][0])
    if name == "export":  # a new plan, so that the new export differs from the old one
        _ok(cases["plan"][0])
    return cases[name]


STAGES = ["calibrate-new", "calibrate-overwrite", "plan", "export", "export-elsewhere",
          "eval", "report"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_every_fault_point_leaves_old_or_new(base_run, tmp_path, stage):
    ref = tmp_path / "ref"
    ref.mkdir()
    args, roots = _case(base_run, stage, ref)
    old = _snapshot(*roots)
    code, points = _run_child(args, roots, None, "none")
    assert code == 0 and points > 3, (code, points)
    print(f"\n{stage}: {points} fault points")
    new = _snapshot(*roots)
    assert new != old
    for target in range(1, points + 1):
        # every point killed; every other one interrupted (Ctrl-C runs the cleanup code)
        for mode in ("kill", "interrupt") if target % 2 else ("kill",):
            tmp = tmp_path / f"{mode}-{target}"
            tmp.mkdir()
            args, roots = _case(base_run, stage, tmp)
            code, _ = _run_child(args, roots, target, mode)
            got = _snapshot(*roots)
            assert got in (old, new), _mix(got, old, new, target, mode)
            # killed; or interrupted (a Ctrl-C during a decided commit lets it finish)
            expected = {137} if mode == "kill" else {130} if got == old else {0, 130}
            assert code in expected, (target, mode, code)
            if target % 3 == 0:  # and the same command then finishes the job
                code, _ = _run_child(args, roots, None, "none")
                assert code == 0 and _snapshot(*roots) == new, (target, mode, code)
            shutil.rmtree(tmp)


def _mix(got, old, new, target, mode) -> str:
    rows = [f"{k}: {'old' if got.get(k) == old.get(k) else ''}"
            f"{'new' if got.get(k) == new.get(k) else ''}" for k in sorted({*got, *old, *new})]
    return f"fault point {target} ({mode}) left a mix:\n" + "\n".join(rows)
