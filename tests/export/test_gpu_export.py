"""`quantcal export --provider cuda` of a tiny model of every family, verified on CUDA: the
calibration runs on CPU, the plan mixes int8, int4-g32 and w8a8 layers with a symmetric int4
token embedding, and the export (fp16 graph) must pass its own parity check against torch
while a strict CUDA session (no node on CPU) opens the model it wrote. Writes only into
pytest's tmp_path; needs ../shared/data (c4) like the other export tests.

``export_on`` is provider-agnostic so it can be tried on CPU while developing
(``export_on(dir, tmp, "cpu")``); only the CUDA run is a test here, since
tests/export/test_export.py already exports every family on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from tinymodels import ALL_FAMILIES, build_tiny_model

from quantcal.cli import cli
from quantcal.export.emit import graph_op_counts, planned_op_counts
from quantcal.plancheck import resolved_formats
from quantcal.provenance import record_path
from quantcal.rundir import RunDir
from quantcal.session import make_session

FORMATS = "int8,int4-g32,int4-g32-sym,w8a8"
EMBEDDING = "int4-g32-sym"  # symmetric: GatherBlockQuantized with explicit midpoint zero points


def _invoke(*args: str) -> None:
    res = CliRunner().invoke(cli, list(args))
    assert res.exit_code == 0, res.output
    assert "CUDA provider unavailable" not in res.output, res.output


def export_on(model_dir: Path, tmp: Path, provider: str, data: str) -> Path:
    """Calibrate ``model_dir`` on CPU, plan with a quantized embedding, export for
    ``provider`` (which verifies on it); returns the model's path after checking its record,
    its op counts and that ``provider`` runs every node."""
    run = tmp / "run"
    _invoke("calibrate", "--model", str(model_dir), "--data", data, "--samples", "4",
            "--seq-len", "32", "--batch-size", "2", "--sensitivity", "fast",
            "--sensitivity-samples", "2", "--formats", FORMATS, "--target-bits", "9",
            "--device", "cpu", "--run", str(run))
    record = RunDir(run).read_run()
    # families whose embedding the plan may quantize: a symmetric int4 table (Gemma's is
    # scaled by sqrt(hidden) and stays fp16, see quantcal/families.py)
    embs = [n for n, i in record.layers.items() if i.kind == "embedding"]
    force = [x for e in embs for x in ("--force", f"{e}={EMBEDDING}")]
    plan, model = tmp / "plan.json", tmp / "model.onnx"
    _invoke("plan", "--run", str(run), "--target-bits", "9", "--no-measure", *force,
            "-o", str(plan))
    _invoke("export", "--provider", provider, "--run", str(run), "--plan", str(plan),
            "-o", str(model))
    parity = json.loads(record_path(model).read_text())["parity"]
    assert parity["passed"] and parity["greedy_match"] == 1.0, parity
    formats = resolved_formats(RunDir(run).read_plan(plan), record, FORMATS.split(","))
    graph = onnx.load(str(model), load_external_data=False)
    fused = json.loads(record_path(model).read_text())["fused"]
    assert graph_op_counts(graph, formats, fused) == planned_op_counts(formats, set(embs), fused)
    assert len({f.name for f in formats.values()}) >= 3, formats  # a real mix
    _, used = make_session(model, provider)
    assert used == provider, f"the {provider} provider cannot run every node of {model}"
    return model


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_export_verified_on_cuda(family, tmp_path, tiny_tokenizer, c4_file) -> None:
    model_dir = tmp_path / family
    build_tiny_model(family).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    export_on(model_dir, tmp_path, "cuda",
              c4_file)
