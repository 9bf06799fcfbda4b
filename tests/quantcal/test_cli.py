"""The command line: help for every command, version, one-line errors, quantcal.toml."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from quantcal import __version__
from quantcal.cli import cli

COMMANDS = ["calibrate", "plan", "export", "generate", "eval", "bench", "report"]


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return CliRunner()


def test_top_level_help_and_version(runner):
    res = runner.invoke(cli, ["--help"])
    assert res.exit_code == 0
    for name in COMMANDS:
        assert name in res.output
    res = runner.invoke(cli, ["--version"])
    assert res.exit_code == 0 and __version__ in res.output


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_real_help(runner, name):
    res = runner.invoke(cli, [name, "--help"])
    assert res.exit_code == 0, res.output
    assert "--run" in res.output and len(res.output.splitlines()) > 4


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "quantcal.cli", "--version"],
                         capture_output=True, text=True, check=True)
    assert __version__ in out.stdout


def test_toml_unknown_key_is_an_error_naming_it(runner, tmp_path):
    (tmp_path / "quantcal.toml").write_text('model = "m"\n[export]\nprovidr = "cpu"\n')
    res = runner.invoke(cli, ["export"])
    assert res.exit_code == 2
    assert "unknown key 'providr' in [export]" in res.output
    assert "Traceback" not in res.output
    (tmp_path / "quantcal.toml").write_text('colour = "red"\n')
    res = runner.invoke(cli, ["export"])
    assert res.exit_code == 2 and "unknown key 'colour'" in res.output


def test_toml_defaults_and_flags_win(tmp_path, monkeypatch):
    """quantcal.toml fills defaults; command-line flags override them."""
    import click

    from quantcal.tomlconfig import load_defaults

    (tmp_path / "quantcal.toml").write_text(
        'model = "from-top"\nrun = "r1"\n[calibrate]\nsamples = 7\nseq-len = 32\n')
    params = {name: cmd.params for name, cmd in cli.commands.items()}
    defaults = load_defaults(tmp_path / "quantcal.toml", params)
    assert defaults["calibrate"] == {"model": "from-top", "run": "r1", "samples": 7,
                                     "seq_len": 32}
    assert defaults["export"] == {"run": "r1"}

    seen = {}

    @click.command()
    @click.option("--samples", type=int, default=1)
    @click.option("--model")
    def probe(samples, model):
        seen.update(samples=samples, model=model)

    CliRunner().invoke(probe, ["--samples", "9"], default_map=defaults["calibrate"])
    assert seen == {"samples": 9, "model": "from-top"}


def test_invalid_toml_is_one_line(runner, tmp_path):
    (tmp_path / "quantcal.toml").write_text("model = \n")
    res = runner.invoke(cli, ["export"])
    assert res.exit_code == 2 and "not valid TOML" in res.output

