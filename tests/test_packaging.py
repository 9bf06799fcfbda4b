"""Packaging: the stage folders install as quantcal.calibrate/export/evaluate, never as
top-level packages, from both a regular (wheel) install and the editable one."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("calibrate", "export", "evaluate")
IMPORT_ALL = "import quantcal.calibrate, quantcal.export, quantcal.evaluate, quantcal.cli"


@pytest.mark.slow
def test_regular_install_has_stage_subpackages(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(REPO)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("quantcal-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "quantcal/evaluate/tasks/__init__.py" in names
    assert "quantcal/data/c4_validation_sample.jsonl.gz" in names  # the offline C4 fallback
    assert "quantcal/data/latency_h100.json" in names  # the default kernel latency table
    for stage in STAGES:
        assert f"quantcal/{stage}/__init__.py" in names
        assert not any(n.startswith(f"{stage}/") for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "quantcal = quantcal.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), str(wheel)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}
    code = IMPORT_ALL + "; import quantcal; print(quantcal.__file__)"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith(str(site))


def test_installed_quantcal_imports_from_anywhere(tmp_path):
    """The install the tests run against (editable in CI) imports the stages by their
    quantcal.* names from an unrelated folder, and `calibrate` is not a top-level name."""
    code = IMPORT_ALL + "; import importlib.util as u; print(u.find_spec('calibrate'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
