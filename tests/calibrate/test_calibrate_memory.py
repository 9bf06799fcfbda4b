"""``quantcal calibrate --sequential`` holds one decoder block at a time, in host RAM too.

The model is loaded with its blocks left in the memory-mapped checkpoint
(``load_model(low_memory=True)``), and AWQ's search, the statistics pass, GPTQ and the
qparams each read one block at a time. Two checks, each against an independent reference:

- the run gives the same bytes (``stats.safetensors``, ``qparams.safetensors``) as the same
  run on the model loaded whole, with and without ``--hessian`` and ``--awq`` (and the same
  sensitivity scores, for which the lazy model is held whole);
- its peak host RAM, measured in a fresh Python process that reads its own
  ``/proc/self/status`` (``VmRSS`` before the run, ``VmHWM`` after, the high-water mark reset
  by writing 5 to ``/proc/self/clear_refs``), independently of quantcal's own peak figures,
  grows by no more than one block's fp32 bytes (and the results', below) between tiny
  Llama models of 2 and 8 blocks (hidden 512, MLP 1536: 12.6 MB a block, 76 MB for the 6
  more blocks), bfloat16 on disk.
  As in tests/export/test_export_memory.py, the probe pins glibc's mmap threshold at its
  128 KiB default (``MALLOC_MMAP_THRESHOLD_``), so these few-MB tensors are mapped and
  unmapped as a real model's (hundreds of MB) are, not kept in a fragmented heap. What does
  grow with depth is the run's result, held until it is written: the statistics and qparams
  (with ``--hessian`` GPTQ's codes, a byte per weight), allowed for by their file sizes.

Before the calibrate stage loaded lazily, the whole float32 model was in memory: the
8-block run grew 83 MB more than the 2-block one (``--hessian``: 99 MB), measured the same
way (``--weight-method rtn``, int4-g32); now 6 MB (``--hessian``: 24 MB, the codes' 24 MB).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import quantcal.calibrate.api as calibrate_api
from quantcal.cli import cli
from tinymodels import build_tiny_model

from memprobe import MB, STATUS, block_bytes, deep_llama_dir, probe

RESULTS = ("stats.safetensors", "qparams.safetensors")

_PROBE = STATUS + r'''
from quantcal.cli import cli

measured(lambda: cli.main(sys.argv[1:], prog_name="quantcal", standalone_mode=False))
'''


def _calibrate(model: Path, data: str, run: Path, *extra: str) -> list[str]:
    return ["calibrate", "--model", str(model), "--data", data, "--samples", "2",
            "--seq-len", "16", "--batch-size", "2", "--device", "cpu", "--sequential",
            "--run", str(run), *extra]


# --- the same bytes as the model loaded whole ---------------------------------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny random Llama saved in bfloat16, as real checkpoints are."""
    folder = tmp_path_factory.mktemp("calibrate-lazy") / "llama"
    build_tiny_model("llama").to(torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("extra", [
    ["--no-sensitivity"],
    ["--no-sensitivity", "--hessian"],
    ["--no-sensitivity", "--awq"],
    ["--sensitivity", "fast", "--sensitivity-samples", "2", "--awq", "--hessian"],
], ids=["stats", "hessian", "awq", "awq-hessian-sensitivity"])
def test_lazy_sequential_run_is_the_whole_one(extra, llama_dir, c4_file, tmp_path,
                                              monkeypatch):
    from quantcal.lazymodel import store_of

    load = calibrate_api.load_model
    seen = []

    def loaded(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        seen.append(store_of(model) is not None)
        return model, tokenizer
    monkeypatch.setattr(calibrate_api, "load_model", loaded)
    formats = ["--formats", "int8,int4-g32,w8a8"]
    lazy = CliRunner().invoke(cli, _calibrate(llama_dir, c4_file, tmp_path / "lazy",
                                              *formats, *extra))
    assert lazy.exit_code == 0, lazy.output
    monkeypatch.setattr(calibrate_api, "load_model",
                        lambda *a, **k: loaded(*a, **{**k, "low_memory": False}))
    whole = CliRunner().invoke(cli, _calibrate(llama_dir, c4_file, tmp_path / "whole",
                                               *formats, *extra))
    assert whole.exit_code == 0, whole.output
    assert seen == [True, False]
    for name in RESULTS:
        assert (tmp_path / "lazy" / name).read_bytes() == \
            (tmp_path / "whole" / name).read_bytes(), name
    if "fast" in extra:  # scored on the whole lazy model, its AWQ folds made on read
        scores = [json.loads((tmp_path / run / "sensitivity.json").read_text())["scores"]
                  for run in ("lazy", "whole")]
        assert scores[0] == scores[1]


# --- host RAM does not grow with depth ----------------------------------------------------

@pytest.fixture(scope="module")
def deep_models(tmp_path_factory, tiny_tokenizer) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("calibrate-memory")
    return {layers: deep_llama_dir(root, layers, tiny_tokenizer) for layers in (2, 8)}


@pytest.mark.parametrize("extra", [[], ["--hessian"]], ids=["stats", "hessian"])
def test_sequential_peak_does_not_grow_with_depth(extra, deep_models, c4_file, tmp_path):
    growth, results = {}, {}
    for layers, folder in deep_models.items():
        run = tmp_path / f"run-{layers}"
        figures = probe(_PROBE, *_calibrate(folder, c4_file, run, "--no-sensitivity",
                                            "--formats", "int4-g32", "--weight-method", "rtn",
                                            *extra), timeout=600)
        growth[layers] = figures["peak"] - figures["base"]
        results[layers] = sum((run / name).stat().st_size for name in RESULTS)
    grew, result = growth[8] - growth[2], results[8] - results[2]
    print(f"\ncalibrate --sequential {' '.join(extra)} growth above baseline (MB): "
          f"{ {n: round(g / MB, 1) for n, g in growth.items()} }; one block "
          f"{block_bytes() / MB:.1f} MB, results {result / MB:.1f} MB more")
    assert grew <= block_bytes() + result, (
        f"calibrate grew {grew / MB:.1f} MB more at 8 blocks than at 2 (one block "
        f"{block_bytes() / MB:.1f} MB, the results written {result / MB:.1f} MB more)")
