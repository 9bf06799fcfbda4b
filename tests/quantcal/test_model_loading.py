"""``load_model`` never prompts, never runs code from the model folder unless told to, never
unpickles, and refuses damaged weights: each bad folder ends in one QuantcalError line (and,
through ``quantcal calibrate``, exit status 2 with the run directory never created)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from quantcal.cli import cli
from quantcal.errors import QuantcalError
from quantcal.models import load_model

BAD_PARAM = "model.layers.1.mlp.down_proj.weight"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _poison(folder: Path, name: str, value: float) -> None:
    """Set one element of the parameter ``name`` to ``value`` in model.safetensors."""
    tensors = load_file(folder / "model.safetensors")
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = value
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _pickle_only(folder: Path) -> None:
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")


CUSTOM_CONFIG = '''
from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "llama"
'''

CUSTOM_MODELING = '''
from transformers import LlamaForCausalLM

from .configuration_tinycustom import TinyCustomConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
'''

AUTO_MAP = {"AutoConfig": "configuration_tinycustom.TinyCustomConfig",
            "AutoModelForCausalLM": "modeling_tinycustom.TinyCustomForCausalLM"}


def _custom(folder: Path, with_code: bool = True) -> None:
    _edit_config(folder, auto_map=AUTO_MAP)
    if with_code:
        (folder / "configuration_tinycustom.py").write_text(CUSTOM_CONFIG)
        (folder / "modeling_tinycustom.py").write_text(CUSTOM_MODELING)


def _error(folder: Path, **kwargs) -> str:
    with pytest.raises(QuantcalError) as info:
        load_model(str(folder), **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_clean_folder_loads_with_trust_remote_code_off(tiny_llama_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs)
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    model, _ = load_model(str(tiny_llama_dir))
    assert model.config.model_type == "llama"
    assert len(seen) == 2 and all(kw.get("trust_remote_code") is False for kw in seen)
    assert seen[-1].get("use_safetensors") is True


def test_auto_map_is_refused_without_trust_remote_code(tiny_llama_dir, tmp_path):
    folder = _copy(tiny_llama_dir, tmp_path / "custom")
    _custom(folder)
    msg = _error(folder)
    assert "needs custom code" in msg and "auto_map" in msg and "--trust-remote-code" in msg


def test_unknown_model_type_is_refused(tiny_llama_dir, tmp_path):
    folder = _copy(tiny_llama_dir, tmp_path / "unknown")
    _edit_config(folder, model_type="tinycustom-unknown")
    msg = _error(folder)
    assert "tinycustom-unknown" in msg and "not known to transformers" in msg


def test_custom_code_runs_with_trust_remote_code(tiny_llama_dir, tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dyn

    monkeypatch.setattr(dyn, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = _copy(tiny_llama_dir, tmp_path / "custom-ok")
    _custom(folder)
    model, _ = load_model(str(folder), trust_remote_code=True)
    assert type(model).__name__ == "TinyCustomForCausalLM"  # the folder's code ran


def test_pickle_only_checkpoint_is_refused(tiny_llama_dir, tmp_path):
    folder = _copy(tiny_llama_dir, tmp_path / "pickle")
    _pickle_only(folder)
    msg = _error(folder)
    assert "safetensors" in msg and "pytorch_model.bin" in msg
    assert "safe_serialization=True" in msg


def test_folder_without_weights_is_refused(tiny_llama_dir, tmp_path):
    folder = _copy(tiny_llama_dir, tmp_path / "noweights")
    (folder / "model.safetensors").unlink()
    assert "no weights" in _error(folder)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_safetensors_is_refused(tiny_llama_dir, tmp_path, damage):
    folder = _copy(tiny_llama_dir, tmp_path / "broken")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"garbage" * 10)
    assert "damaged weight file" in _error(folder)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_refused_naming_it(tiny_llama_dir, tmp_path, value):
    folder = _copy(tiny_llama_dir, tmp_path / "damaged")
    _poison(folder, BAD_PARAM, value)
    msg = _error(folder)
    assert BAD_PARAM in msg and "damaged" in msg
    assert ("NaN" if value != value else "Inf") in msg


def test_fp16_overflow_at_load_suggests_float32(tiny_llama_dir, tmp_path):
    folder = _copy(tiny_llama_dir, tmp_path / "big")
    _poison(folder, BAD_PARAM, 1e6)  # finite in float32, inf in float16
    load_model(str(folder))  # float32: fine
    msg = _error(folder, dtype=torch.float16)
    assert BAD_PARAM in msg and "--dtype float32" in msg


@pytest.mark.parametrize("case", ["custom code", "pickle only", "nan weight", "inf weight"])
def test_calibrate_cli_refuses_bad_model_folder(case, tiny_llama_dir, tmp_path, c4_file):
    folder = _copy(tiny_llama_dir, tmp_path / "model")
    expect = {"custom code": "--trust-remote-code", "pickle only": "safetensors",
              "nan weight": BAD_PARAM, "inf weight": BAD_PARAM}[case]
    if case == "custom code":
        _custom(folder)
    elif case == "pickle only":
        _pickle_only(folder)
    else:
        _poison(folder, BAD_PARAM, float("nan") if case == "nan weight" else float("inf"))
    run = tmp_path / "run"
    argv = ["calibrate", "--model", str(folder), "--data", c4_file, "--samples", "4",
            "--seq-len", "32", "--batch-size", "2", "--no-sensitivity", "--run", str(run)]
    res = CliRunner().invoke(cli, argv)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("quantcal: error")]
    assert len(lines) == 1, res.output
    assert expect in lines[0]
    assert "Traceback" not in res.output
    assert not run.exists()


def test_calibrate_cli_has_trust_remote_code_flag():
    res = CliRunner().invoke(cli, ["calibrate", "--help"])
    assert "--trust-remote-code" in res.output
