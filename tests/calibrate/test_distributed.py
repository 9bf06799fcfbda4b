"""`quantcal calibrate` over two ranks (gloo, CPU) against one process: the same run
directory bit for bit, written by rank 0 alone; any rank's failure is one line and exit
status 2 on every rank, with no hang.

The ranks are real processes: started by torchrun (``python -m torch.distributed.run``,
whose agent hosts the store) or, where each rank needs its own working directory or its
own exit status, with the environment torchrun gives them (rank 0 hosts the store). Every
process runs one thread (torchrun's default), the single-process reference too.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantcal.calibrate.shards import assign, shard
from quantcal.rundir import PLAN, QPARAMS, RUN_JSON, SENSITIVITY, STATS

TIMEOUT_S = 120  # a hang fails the test instead of the suite
VOLATILE = {"timings", "created"}  # fields that differ between any two runs


def _args(model, data, run, *extra) -> list[str]:
    # 10 windows in batches of 4: 3 batches (the last one short) on 2 ranks: shards of 2, 1
    return ["calibrate", "--model", str(model), "--data", data, "--samples", "10",
            "--seq-len", "32", "--batch-size", "4", "--sensitivity-samples", "4",
            "--formats", "int8,int4-g32,w8a8", "--run", str(run), "-q", *extra]


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", NCCL_NVLS_ENABLE="0", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               QUANTCAL_DIST_TIMEOUT="60", **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single(cwd: Path, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantcal", *argv], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def _ranks(cwds: list[Path], argv: list[str]) -> list[tuple[int, str]]:
    """Start one process per folder as torchrun would (rank i in ``cwds[i]``); returns each
    rank's exit status and stderr, rank 0 first."""
    port = str(_free_port())
    procs = []
    for rank, cwd in enumerate(cwds):
        env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE=str(len(cwds)),
                   LOCAL_WORLD_SIZE=str(len(cwds)))
        procs.append(subprocess.Popen([sys.executable, "-m", "quantcal", *argv], cwd=cwd,
                                      env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        outs = [p.communicate(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, err) for p, (_, err) in zip(procs, outs)]


def _error_lines(results: list[tuple[int, str]]) -> list[str]:
    return [line for _, err in results for line in err.splitlines() if line.strip()]


def _json_without_volatile(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in VOLATILE}


def test_torchrun_two_ranks_write_what_one_process_writes(tmp_path, tiny_llama_dir, c4_file):
    """Statistics, qparams, sensitivity and plan equal bit for bit: the batches are split
    at the single process's batch boundaries, order-free statistics all-reduced, float sums
    added along the ranks in batch order, and each layer's KL computed whole on one rank."""
    ref = tmp_path / "ref"
    ref.mkdir()
    one = _single(ref, _args(tiny_llama_dir, c4_file, "run"))
    assert one.returncode == 0, one.stderr
    for r in ("r0", "r1"):
        (tmp_path / r).mkdir()
    # each rank enters its own folder, so whatever rank 1 wrote would show; "--" keeps
    # torchrun from taking quantcal's --run for an abbreviation of its --run-path
    rank_cwd = 'cd "r$LOCAL_RANK" && exec "$0" -m quantcal "$@"'
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", "2", "--no-python", "--", "sh", "-c", rank_cwd, sys.executable,
           *_args(tiny_llama_dir, c4_file, "run")]
    two = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=TIMEOUT_S)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("calibrated 15 layers") == 1  # rank 0 reports, for both
    assert not list((tmp_path / "r1").iterdir())  # rank 1 wrote nothing
    a, b = ref / "run", tmp_path / "r0" / "run"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for name in (STATS, QPARAMS, PLAN):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for name in (SENSITIVITY, RUN_JSON):
        assert _json_without_volatile(a / name) == _json_without_volatile(b / name), name
    assert json.loads((b / SENSITIVITY).read_text())["method"] == "exact"


def test_bad_argument_on_every_rank_is_one_line(tmp_path, tiny_llama_dir, c4_file):
    cwds = [tmp_path / "r0", tmp_path / "r1"]
    for c in cwds:
        c.mkdir()
    results = _ranks(cwds, _args(tiny_llama_dir, c4_file, tmp_path / "run", "--seq-len", "0"))
    assert [code for code, _ in results] == [2, 2]
    lines = _error_lines(results)
    assert len(lines) == 1 and lines[0].startswith("quantcal: error:") and "--seq-len" in lines[0]
    assert not (tmp_path / "run").exists()


def test_one_follower_failing_ends_every_rank_with_its_line(tmp_path, tiny_llama_dir,
                                                            c4_file):
    """Only rank 0's folder holds the model (a relative --model): rank 1 cannot load it;
    rank 0 hears of it at its first op and says so for both."""
    cwds = [tmp_path / "r0", tmp_path / "r1"]
    for c in cwds:
        c.mkdir()
    (cwds[0] / "tiny").symlink_to(tiny_llama_dir, target_is_directory=True)
    results = _ranks(cwds, _args("tiny", c4_file, tmp_path / "run"))
    assert [code for code, _ in results] == [2, 2]
    lines = _error_lines(results)
    assert len(lines) == 1 and lines[0].startswith("quantcal: error: rank 1: "), lines
    assert "tiny" in lines[0]
    assert not (tmp_path / "run").exists()  # made by rank 0, removed when nothing landed


def test_the_leader_failing_ends_the_followers(tmp_path, tiny_llama_dir, c4_file):
    """Rank 0's run directory holds an unreadable run.json (a relative --run; rank 1's
    folder has none): rank 0 refuses, and rank 1, waiting for an op, ends too."""
    cwds = [tmp_path / "r0", tmp_path / "r1"]
    for c in cwds:
        c.mkdir()
    (cwds[0] / "run").mkdir()
    (cwds[0] / "run" / RUN_JSON).write_text("{not json")
    results = _ranks(cwds, _args(tiny_llama_dir, c4_file, "run"))
    assert [code for code, _ in results] == [2, 2]
    lines = _error_lines(results)
    assert len(lines) == 1 and "cannot read" in lines[0] and "--overwrite" in lines[0], lines
    assert not list(cwds[1].iterdir())


@pytest.mark.parametrize("n,size", [(0, 2), (1, 2), (3, 2), (7, 3), (8, 8), (5, 8)])
def test_shards_are_contiguous_and_cover_every_batch_once(n, size):
    parts = [shard(n, size, r) for r in range(size)]
    assert [i for p in parts for i in p] == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_assign_is_deterministic_and_within_one_layer_of_an_even_split():
    costs = [9.0, 9.0, 8.0, 8.0, 7.0, 7.0, 3.0, 3.0, 1.0, 30.0]
    owner = assign(costs, 3)
    assert owner == assign(list(costs), 3)
    load = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(3)]
    assert max(load) <= sum(costs) / 3 + max(costs)
    assert set(owner) == {0, 1, 2}
    assert assign([1.0, 1.0], 4) == [0, 1]  # more ranks than layers: some score none
