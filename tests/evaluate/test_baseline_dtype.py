"""The torch baseline runs in float32 on CPU and, on a GPU, in the checkpoint's own dtype
(config.json), as its authors ran it; the eval label says which."""

from __future__ import annotations

import json

import pytest
import torch

from quantcal.evaluate.api import torch_dtype


@pytest.mark.parametrize("saved, on_gpu", [("bfloat16", torch.bfloat16),
                                           ("float16", torch.float16),
                                           ("float32", torch.float32),
                                           (None, torch.float32)])
def test_baseline_dtype_is_the_checkpoints_on_a_gpu(tiny_llama_dir, tmp_path, saved, on_gpu):
    folder = tmp_path / "m"
    folder.mkdir()
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    if saved:
        config["dtype"] = saved
    (folder / "config.json").write_text(json.dumps(config))
    assert torch_dtype(str(folder), "cuda") == on_gpu
    assert torch_dtype(str(folder), "cuda:1") == on_gpu
    assert torch_dtype(str(folder), "cpu") == torch.float32


def test_onnx_models_take_no_torch_dtype(tmp_path):
    assert torch_dtype(None, "cuda") == torch.float32
    assert torch_dtype(str(tmp_path / "model.onnx"), "cuda") == torch.float32
    assert torch_dtype(str(tmp_path), "cuda") == torch.float32  # a folder with no config
