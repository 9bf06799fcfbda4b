"""The conftest's data and skip policy, run on a throwaway test file in a fresh pytest: a
skip for something missing fails, a test's own not-applicable skip and the GPU mark's skip
pass, full_data tests are left out (with a line) when there is no full data, and a
QUANTCAL_TEST_DATA that is not a folder stops the run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
CASES = '''
import pytest

@pytest.fixture
def needs_file():
    pytest.skip("shipped file not found")

def test_skip_missing_file():
    pytest.skip("data file not found: x.jsonl")

def test_fixture_skip(needs_file):
    pass

def test_importorskip():
    pytest.importorskip("no_such_module_for_quantcal")

@pytest.mark.skipif(True, reason="no shared data")
def test_skipif_marker():
    pass

@pytest.mark.parametrize("fmt", ["int4", "fp16"])
def test_not_applicable(fmt):
    if fmt == "fp16":
        pytest.skip("GPTQ codes exist only for the MatMulNBits formats")

@pytest.mark.gpu
def test_gpu():
    pass

def test_full(full_data):
    assert full_data.is_dir()
'''


def _pytest(tmp_path: Path, full: str) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    for name in ("conftest.py", "tinymodels.py"):
        shutil.copy(TESTS / name, tmp_path / name)
    (tmp_path / "test_cases.py").write_text(CASES)
    (tmp_path / "r.xml").unlink(missing_ok=True)
    env = {**os.environ, "QUANTCAL_TEST_DATA": full}
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                          "--rootdir", str(tmp_path), "--junit-xml", str(tmp_path / "r.xml"),
                          str(tmp_path / "test_cases.py")],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    outcomes = {}
    if (tmp_path / "r.xml").exists():
        for case in ET.parse(tmp_path / "r.xml").iter("testcase"):
            kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
            outcomes[case.get("name")] = kinds[0] if kinds else "passed"
    return res, outcomes


def test_skips_for_missing_things_fail_and_others_pass(tmp_path):
    res, got = _pytest(tmp_path, "")
    assert res.returncode == 1, res.stdout + res.stderr
    assert got["test_skip_missing_file"] == got["test_importorskip"] == "failure", got
    # a skip while setting up (a fixture's, a skipif mark's) fails there: junit says error
    assert got["test_fixture_skip"] == got["test_skipif_marker"] == "error", got
    assert got["test_not_applicable[int4]"] == "passed"
    assert got["test_not_applicable[fp16]"] == "skipped"
    assert got["test_gpu"] == ("passed" if torch.cuda.is_available() else "skipped")
    assert "test_full" not in got and "1 full_data tests not run" in res.stdout
    assert "may not skip for a missing file" in res.stdout


def test_full_data_runs_when_named_and_a_bad_name_stops_the_run(tmp_path):
    folder = tmp_path / "full"
    folder.mkdir()
    _, got = _pytest(tmp_path, str(folder))
    assert got["test_full"] == "passed"
    res, got = _pytest(tmp_path, str(tmp_path / "nowhere"))
    assert res.returncode == 4 and not got
    assert "QUANTCAL_TEST_DATA" in res.stderr and "is not a folder" in res.stderr
