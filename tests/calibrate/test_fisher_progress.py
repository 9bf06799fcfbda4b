"""The Fisher pass (``--sensitivity fast``, and the proxy beside the exact scores) shows a
progress bar like the other long steps, counting held-out windows; ``-q`` turns it off."""

from __future__ import annotations

import torch
from click.testing import CliRunner

from tinymodels import build_tiny_model
from quantcal.calibrate.sensitivity import output_fisher
from quantcal.cli import cli
from quantcal.models import quantizable_layers

BAR = "sensitivity (Fisher)"


def test_output_fisher_counts_windows(capsys):
    model = build_tiny_model("llama")
    held = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(0))
    names = [n for n, i in quantizable_layers(model).items() if i.kind != "embedding"]
    output_fisher(model, held, names, batch_size=2, device=torch.device("cpu"))
    err = capsys.readouterr().err
    assert BAR in err and "3/3" in err and "window" in err
    output_fisher(model, held, names, batch_size=2, device=torch.device("cpu"), progress=False)
    assert capsys.readouterr().err == ""


def test_calibrate_fast_shows_the_fisher_bar_unless_quiet(tiny_llama_dir, c4_file, tmp_path):
    argv = ["calibrate", "--model", str(tiny_llama_dir), "--data", c4_file, "--samples", "2",
            "--seq-len", "16", "--sensitivity", "fast", "--sensitivity-samples", "2",
            "--keep", "*", "--device", "cpu"]
    res = CliRunner().invoke(cli, argv + ["--run", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert BAR in res.stderr
    res = CliRunner().invoke(cli, ["-q", *argv, "--run", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert BAR not in res.output and "%|" not in res.output
