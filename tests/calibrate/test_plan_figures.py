"""The plan's predicted sizes against the files a user gets: ``export --provider cuda``
(fp16) and ``--provider cpu`` (fp32 unquantized parts and scales), on a tied tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from quantcal.cli import cli
from quantcal.rundir import RunDir
from tinymodels import build_tiny_model

NO_PARAMETERS = ("cos_cache", "sin_cache")  # rotary tables: computed, not weights
WIDTH = {onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT8: 1, onnx.TensorProto.FLOAT16: 2,
         onnx.TensorProto.FLOAT: 4}


@pytest.fixture(scope="module")
def tied_run(tmp_path_factory, tiny_tokenizer, c4_file):
    model_dir = tmp_path_factory.mktemp("tiny-qwen2-tied")
    build_tiny_model("qwen2").save_pretrained(model_dir)  # its config ties the embeddings
    tiny_tokenizer.save_pretrained(model_dir)
    run = tmp_path_factory.mktemp("figures") / "run"
    res = CliRunner().invoke(cli, [
        "calibrate", "--model", str(model_dir), "--data",
        c4_file, "--samples", "4", "--seq-len",
        "32", "--batch-size", "3", "--sensitivity-samples", "2", "--formats",
        "int8,int4-g32", "--target-bits", "6", "--run", str(run)])
    assert res.exit_code == 0, res.output
    return RunDir(run), res.output


def _parameter_bytes(path: Path) -> int:
    """Bytes of the weights the file stores (initializers, as their own dtype)."""
    graph = onnx.load(str(path), load_external_data=False)
    total = 0
    for init in graph.graph.initializer:
        if init.name in NO_PARAMETERS or init.data_type not in WIDTH:
            continue
        total += int(np.prod(init.dims)) * WIDTH[init.data_type] if init.dims else 0
    return total


def _file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


@pytest.mark.parametrize("provider", ["cuda", "cpu"])
def test_predicted_sizes_match_the_exports(tied_run, tmp_path, provider):
    from quantcal.export.api import export_onnx

    run, output = tied_run
    plan = run.read_plan()
    assert plan.totals.get("lm_head_shares_embedding") == 1.0  # tied fp16 head: free
    predicted = {"cuda": plan.predicted_size_bytes, "cpu": plan.predicted_size_fp32_bytes}
    path = tmp_path / "model.onnx"
    out = export_onnx(run, provider=provider, verify_provider="cpu", output=path)
    assert out.passed
    stored = _parameter_bytes(path)
    assert 0 <= stored - predicted[provider] <= 8  # but for the first norm's two scalars
    other = predicted["cpu" if provider == "cuda" else "cuda"]
    actual = _file_bytes(path)  # the graph itself and the rotary tables on top
    assert abs(actual - predicted[provider]) < abs(actual - other)
    assert f"{predicted['cuda'] / 1e6:.1f} MB (fp16" in output
    assert f"{predicted['cpu'] / 1e6:.1f} MB (fp32" in output
