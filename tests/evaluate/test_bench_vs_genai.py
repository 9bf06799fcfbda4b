"""examples/bench_vs_genai.py end to end on CPU: a tiny quantcal export against
onnxruntime-genai on the same folder (every export folder is a genai model), prefill and
decode at two batch sizes, ratios of medians; the genai_config.json copies that switch
genai's CUDA graph on and off (the GPU runs are not possible here).

Needs onnxruntime-genai (``pip install quantcal[genai]``)."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantcal.cli import cli

og = pytest.importorskip("onnxruntime_genai",
                         reason="onnxruntime-genai is not installed: pip install quantcal[genai]")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "bench_vs_genai.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_vs_genai", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def export(tmp_path_factory, tiny_llama_dir, c4_file) -> Path:
    """A tiny Llama exported for CPU (int8 / int4-g32): model.onnx and its genai files."""
    run = tmp_path_factory.mktemp("bench-genai") / "run"
    for args in (["calibrate", "--model", str(tiny_llama_dir), "--data", c4_file, "--samples",
                  "4", "--seq-len", "32", "--batch-size", "2", "--sensitivity", "fast",
                  "--sensitivity-samples", "2", "--formats", "int8,int4-g32",
                  "--target-bits", "9", "--device", "cpu", "--run", str(run)],
                 ["export", "--provider", "cpu", "--run", str(run)]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 0, res.output
    return run


def test_runs_end_to_end_on_cpu(bench, export):
    runs, speeds, failed = bench.run(export / "model.onnx", export, provider="cpu",
                                     batches=(1, 2), prompt_len=24, new_tokens=4, rounds=2)
    assert failed == {}
    assert [(c.name, c.side) for c in runs] == [("quantcal", "quantcal"), ("genai", "genai")]
    assert set(speeds) == {(p, b) for p in ("prefill", "decode") for b in (1, 2)}
    for by_name in speeds.values():
        assert set(by_name) == {"quantcal", "genai"}
        assert all(len(v) == 2 and min(v) > 0 for v in by_name.values())
    text = bench.format_results(runs, speeds, prompt_len=24, new_tokens=4, rounds=2)
    ratios = [float(line.rsplit(":", 1)[1]) for line in text.splitlines()
              if line.strip().startswith("ratio quantcal / genai")]
    want = [statistics.median(v["quantcal"]) / statistics.median(v["genai"])
            for v in speeds.values()]
    assert ratios == pytest.approx(want, rel=2e-3)
    assert "prefill of 24 tokens, batch 2" in text and "decode, 4 steps" in text


def test_a_failing_contender_is_reported_not_fatal(bench):
    def broken(*args):
        raise RuntimeError("no graph for this batch")

    ok = bench.Contender("quantcal", "quantcal", lambda p: 1e-3, lambda p, n: 1e-3)
    bad = bench.Contender("genai", "genai", broken, broken)
    speeds, failed = bench.measure([ok, bad], batches=(1,), prompt_len=4, new_tokens=2,
                                   rounds=2)
    assert failed == {("genai", 1): "no graph for this batch"}
    assert speeds["decode", 1] == {"quantcal": [2000.0, 2000.0], "genai": []}
    text = bench.format_results([ok, bad], speeds, prompt_len=4, new_tokens=2, rounds=2,
                                failed=failed)
    assert "genai                      failed: no graph for this batch" in text
    assert "ratio" not in text


def test_command_line(bench, export, capsys):
    bench.main([str(export / "model.onnx"), str(export), "--provider", "cpu", "--batch", "1",
                "--prompt-len", "8", "--new-tokens", "2", "--rounds", "1"])
    out = capsys.readouterr().out
    assert out.count("ratio quantcal / genai") == 2 and "CUDA graph" not in out


@pytest.mark.parametrize("provider, graph", [("cuda", True), ("cuda", False), ("cpu", False)])
def test_genai_copy_switches_only_the_copy(bench, export, tmp_path, provider, graph):
    original = (export / "genai_config.json").read_text()
    out = bench.genai_copy(export, tmp_path / "copy", provider, graph)
    config = json.loads((out / "genai_config.json").read_text())
    options = config["model"]["decoder"]["session_options"]["provider_options"]
    if provider == "cuda":
        assert options == [{"cuda": {"enable_cuda_graph": "1" if graph else "0"}}]
    else:
        assert options == []
    assert (export / "genai_config.json").read_text() == original
    linked = {p.name for p in out.iterdir() if p.is_symlink()}
    assert {"model.onnx", "model.onnx.data", "model.genai.onnx", "tokenizer.json"} <= linked
    assert all((out / n).resolve() == (export / n).resolve() for n in linked)
    # a CUDA copy of a CUDA config keeps its other CUDA options
    cuda = json.loads(original)
    cuda["model"]["decoder"]["session_options"]["provider_options"] = [
        {"cuda": {"enable_cuda_graph": "1", "device_id": "0"}}]
    source = tmp_path / "cuda-source"
    source.mkdir()
    (source / "genai_config.json").write_text(json.dumps(cuda))
    again = bench.genai_copy(source, tmp_path / "again", "cuda", False)
    options = json.loads((again / "genai_config.json").read_text())["model"]["decoder"][
        "session_options"]["provider_options"]
    assert options == [{"cuda": {"enable_cuda_graph": "0", "device_id": "0"}}]
