"""Per-stage peaks: the host high-water mark really resets per stage (a later stage does not
inherit an earlier one's peak), and calibrate and eval record and print their peaks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from quantcal.cli import cli
from quantcal.resources import host_peak_bytes, peak_figures, start_stage

MB = 1 << 20


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_host_peak_is_per_stage():
    start_stage()
    block = np.ones(400 * MB // 8)  # 400 MB, touched
    del block
    big = peak_figures()
    start_stage()
    np.ones(MB // 8).sum()
    small = peak_figures()
    assert big["peak_host_bytes"] >= _rss() + 350 * MB  # it saw the 400 MB
    # the next stage starts from the current RSS, not from the earlier peak
    assert small["peak_host_bytes"] < big["peak_host_bytes"] - 300 * MB
    assert "peak_host_is_process_lifetime" not in small
    assert host_peak_bytes() >= _rss()


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tiny_llama_dir, c4_file):
    run = tmp_path_factory.mktemp("peaks") / "run"
    res = CliRunner().invoke(cli, [
        "calibrate", "--model", str(tiny_llama_dir), "--data", c4_file, "--samples", "4",
        "--seq-len", "32", "--sensitivity", "fast", "--sensitivity-samples", "2",
        "--keep", "*", "--device", "cpu", "--run", str(run)])
    assert res.exit_code == 0, res.output
    return run, res.output


def test_calibrate_records_and_prints_its_peaks(calibrated):
    run, output = calibrated
    timings = json.loads((run / "run.json").read_text())["timings"]
    assert timings["peak_host_bytes"] > 50 * MB  # torch and a model are resident
    assert timings["peak_gpu_bytes"] == 0  # CPU only
    assert f"peak host RAM {timings['peak_host_bytes'] / 1e9:.2f} GB" in output


def test_eval_records_and_prints_its_peaks(calibrated, tiny_llama_dir, sample_data):
    run, _ = calibrated
    res = CliRunner().invoke(cli, ["eval", str(tiny_llama_dir), "--tasks", "hellaswag",
                                   "--limit", "2", "--device", "cpu", "--run", str(run),
                                   "--data-dir", str(sample_data)])
    assert res.exit_code == 0, res.output
    (variant,) = json.loads((run / "eval.json").read_text())["variants"].values()
    peak = variant["resources"]["peak_host_bytes"]
    assert peak > 50 * MB and f"peak host RAM {peak / 1e9:.2f} GB" in res.output


def test_export_records_and_prints_its_peaks(calibrated):
    run, _ = calibrated
    res = CliRunner().invoke(cli, ["export", "--provider", "cpu", "--run", str(run)])
    assert res.exit_code == 0, res.output
    timings = json.loads((run / "export.json").read_text())["timings"]
    peak = timings["peak_host_bytes"]
    assert peak > 50 * MB and f"peak host RAM {peak / 1e9:.2f} GB" in res.output
