"""What users bring from Hugging Face, lm-eval and onnxruntime tools: dependency floors that
are checked, ``--provider`` / ``--device`` that mean what they say (auto falls back with one
notice, an explicit cuda that cannot run is one error line), no onnxruntime noise on CPU,
``-q`` / ``-v`` and ``python -m quantcal``.

The machine's real CUDA state varies (this CI has onnxruntime-gpu without a GPU; a GPU
machine has both), so tests that need "CUDA cannot run" say so through the session module's
probe; the test of onnxruntime's own log uses the real probe.
"""

from __future__ import annotations

import configparser
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantcal import __version__
from quantcal.cli import cli

REPO = Path(__file__).resolve().parents[2]


def _invoke(args):
    return CliRunner().invoke(cli, args)


def _one_error_line(res, *words):
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("quantcal: error: "), res.output
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama_dir, c4_file) -> Path:
    """A tiny calibrated (all fp16) run exported for CPU."""
    out = tmp_path_factory.mktemp("conventions") / "run"
    for argv in (["calibrate", "--model", str(tiny_llama_dir), "--data",
                  c4_file, "--samples", "4",
                  "--seq-len", "32", "--sensitivity", "fast", "--sensitivity-samples", "2",
                  "--keep", "*", "--device", "cpu", "--run", str(out)],
                 ["export", "--provider", "cpu", "--run", str(out)]):
        res = _invoke(argv)
        assert res.exit_code == 0, res.output
    return out


@pytest.fixture(autouse=True)
def library_output():
    """-q turns progress bars and warnings of transformers, the hub and datasets off for the
    process: back on after each test."""
    yield
    import datasets
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    hf_logging.set_verbosity_warning()
    enable_progress_bars()
    datasets.enable_progress_bars()


@pytest.fixture
def no_cuda(monkeypatch):
    """A machine where the CUDA provider cannot run (its build has one)."""
    import quantcal.session as session

    monkeypatch.setattr(session, "cuda_unusable", lambda device_id=0: "no GPU in this test")
    monkeypatch.setattr(session.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(session, "_noticed", set())


# dependency floors ----------------------------------------------------------------------


def _install_requires() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    floors = {}
    for line in cfg["options"]["install_requires"].strip().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)>=([0-9.]+)", line.strip())
        if m:
            floors[m.group(1)] = m.group(2)
    return floors


def test_setup_cfg_floors_are_the_checked_ones_and_cover_what_the_code_uses():
    from quantcal.versions import FLOORS, release

    required = _install_requires()
    assert {f.requirement: f.version for f in FLOORS}.items() <= required.items()
    # transformers: from_pretrained(dtype=) came in 4.56, config.rope_parameters in 5.0;
    # onnxruntime-gpu: 8-bit MatMulNBits on CUDA in 1.22.0, GatherBlockQuantized on CUDA in
    # 1.23.0, its 4-bit packed indexing fixed on CUDA after 1.23.2 (first release: 1.24.1)
    assert release(required["transformers"]) >= (5, 0)
    assert release(required["onnxruntime-gpu"]) >= (1, 24, 1)


def test_this_environment_meets_the_floors():
    from quantcal.versions import check_versions

    check_versions()


@pytest.mark.parametrize("dist, have", [("onnxruntime-gpu", "1.22.0"),
                                        ("transformers", "4.57.1")])
def test_an_older_dependency_is_one_line_and_help_still_works(monkeypatch, dist, have):
    import quantcal.versions as versions

    real = versions.installed
    monkeypatch.setattr(versions, "installed",
                        lambda name: have if name == dist else real(name))
    res = _invoke(["report", "--run", "nowhere"])
    _one_error_line(res, ">= ", have, "pip install -U")
    assert _invoke(["report", "--help"]).exit_code == 0


def test_python_dash_m_quantcal_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "quantcal", "--version"], capture_output=True,
                         text=True, check=True)
    assert __version__ in out.stdout


# --provider and --device ----------------------------------------------------------------


def test_export_and_eval_default_to_auto():
    defaults = {(cmd, p.name): p.default for cmd, c in cli.commands.items() for p in c.params}
    assert defaults[("export", "provider")] == "auto"
    assert defaults[("eval", "provider")] == "auto"
    assert defaults[("eval", "device")] == "auto"


@pytest.mark.parametrize("argv", [
    ["generate", "--prompt", "Hello"], ["export"], ["bench", "--prompt-len", "16",
                                                    "--new-tokens", "4"],
    ["eval", "--tasks", "wikitext2", "--limit", "1"]], ids=lambda a: a[0])
def test_explicit_cuda_that_cannot_run_is_one_line(run, no_cuda, argv, sample_data):
    extra = ["--data-dir", str(sample_data)] if argv[0] == "eval" else []
    res = _invoke(argv + extra + ["--run", str(run), "--provider", "cuda"])
    _one_error_line(res, "--provider cuda", "no GPU in this test", "--provider cpu")


def test_auto_falls_back_to_cpu_with_one_notice(run, no_cuda, tmp_path):
    res = _invoke(["generate", "--prompt", "Hello", "--max-new-tokens", "3", "--run", str(run)])
    assert res.exit_code == 0, res.output
    notices = [line for line in res.stderr.splitlines() if "CUDA" in line]
    assert notices == ["quantcal: CUDA provider unavailable (no GPU in this test); running "
                       "on CPU"]
    assert "tokens on cpu" in res.stderr
    # export's default (auto) exports for the CPU provider here: fp32
    res = _invoke(["export", "--run", str(run), "-o", str(tmp_path / "m.onnx")])
    assert res.exit_code == 0, res.output
    assert "float32" in res.stdout


def test_eval_device_auto_resolves_before_the_backend(monkeypatch, tmp_path):
    """``--device auto`` is cuda where torch sees a GPU, cpu elsewhere: the torch backend
    gets a real device, never the word auto."""
    import torch

    import quantcal.evaluate.api as api
    from quantcal.rundir import RunDir

    seen = []

    def backend(name, run, *, provider, device, batch_size, **_):
        seen.append(device)
        raise KeyboardInterrupt  # enough: the device is what this test is about

    monkeypatch.setattr(api, "make_backend", backend)
    for available, expected in ((False, "cpu"), (True, "cuda")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda a=available: a)
        with pytest.raises(KeyboardInterrupt):
            api.evaluate("some/model", RunDir(tmp_path), ["wikitext2"], limit=1,
                         sample=None, seed=0, provider="cpu", data_dir=None, baseline=False)
        assert seen[-1] == torch.device(expected)


# onnxruntime's own log --------------------------------------------------------------------


def test_auto_on_a_machine_without_cuda_prints_no_onnxruntime_log(run, capfd, caplog):
    """onnxruntime-gpu on a machine where its CUDA provider cannot load logs half a dozen
    lines of its own per session; quantcal says it once, in one line (or nothing, where CUDA
    works or the build has no CUDA)."""
    import quantcal.session as session

    session.cuda_unusable.cache_clear()
    session._noticed.clear()
    capfd.readouterr()
    with caplog.at_level(logging.WARNING, logger="quantcal"):
        for _ in range(2):
            _, used = session.make_session(run / "model.onnx", "auto")
    err = capfd.readouterr().err  # onnxruntime writes its log to file descriptor 2
    assert all(line.startswith("quantcal: ") for line in err.splitlines() if line.strip()), err
    assert "[W:onnxruntime" not in err and "[E:onnxruntime" not in err, err
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) <= 1 and (used == "cpu" or not notices), notices


def test_cpu_never_asks_for_cuda(run, monkeypatch):
    import onnxruntime as ort

    from quantcal.graphrunner import decoding_runner

    asked = []
    real = ort.InferenceSession

    def recording(model, sess_options=None, providers=None, **kw):
        asked.append(str(providers))
        return real(model, sess_options, providers=providers, **kw)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    runner = decoding_runner(run / "model.onnx", "cpu")
    runner.generate([1, 2, 3], 2)
    assert asked and not any("CUDA" in p for p in asked), asked


# -q / -v ------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_prints_results_and_errors_only(run, no_cuda, where):
    args = ["generate", "--prompt", "Hello", "--max-new-tokens", "3", "--run", str(run)]
    res = _invoke(["-q", *args] if where == "before" else [*args, "-q"])
    assert res.exit_code == 0, res.output
    assert res.stderr == "" and res.stdout.startswith("Hello")
    res = _invoke([*args, "-q", "--provider", "cuda"])
    _one_error_line(res, "--provider cuda")


def test_quiet_eval_has_no_progress_bars(run, sample_data):
    args = ["eval", "--run", str(run), "--tasks", "hellaswag", "--limit", "2", "--provider",
            "cpu", "--data-dir", str(sample_data)]
    assert "%|" in _invoke(args).stderr  # the bars quiet turns off
    res = _invoke(args + ["-q"])
    assert res.exit_code == 0, res.output
    assert "%|" not in res.output and "acc_norm" in res.stdout


def test_verbose_shows_debug_messages(run):
    args = ["generate", "--prompt", "Hello", "--max-new-tokens", "2", "--run", str(run),
            "--provider", "cpu"]
    assert "runs on" not in _invoke(args).stderr
    res = _invoke(["-v", *args])
    assert res.exit_code == 0 and "quantcal: model.onnx runs on CPUExecutionProvider" in res.stderr
    _one_error_line(_invoke(["-q", *args, "-v"]), "-q/--quiet", "-v/--verbose")


def test_quiet_works_without_the_datasets_package(monkeypatch):
    """-q silences the libraries it finds: an install reading only local files may lack
    datasets (it crashed `quantcal -q calibrate` on the GPU machine)."""
    import sys

    from quantcal.clioutput import configure_output

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    try:
        configure_output(True, False)
    finally:
        configure_output(False, False)
