"""A hub id on a machine that cannot reach the hub: one line at once when the model is not
cached (the hub client would retry for up to a minute first), the cached copy when it is;
never a connection attempt. Offline mode is switched off here (the test suite runs with
HF_HUB_OFFLINE=1) and the hub made unreachable, with every socket lookup recorded."""

from __future__ import annotations

import importlib
import shutil
import socket
import time

import pytest
from click.testing import CliRunner

from quantcal.cli import cli

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def unreachable(monkeypatch, tmp_path):
    """No offline mode, no hub, an empty HF cache under tmp_path; yields the recorded
    socket lookups (none may happen)."""
    import huggingface_hub.constants as constants

    import quantcal.models as models

    lookups = []

    def lookup(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(-2, "Name or service not known")

    # the hub client's own best-effort fetch of its agent registry (once per process, never
    # retried) is not what this test is about: take it as done
    try:
        agent = importlib.import_module("huggingface_hub.utils._detect_agent")
    except ImportError:  # older hub clients fetch no such registry
        agent = None
    if agent is not None:
        monkeypatch.setattr(agent, "_registry", getattr(agent, "_EMPTY_REGISTRY", None),
                            raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    monkeypatch.setattr(time, "sleep", lambda s: None)  # a retry loop would not wait here
    return lookups


def _cache(folder, repo: str, hub) -> None:
    """``folder``'s files as the HF cache holds a snapshot of ``repo``."""
    root = hub / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / COMMIT)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)


def test_uncached_hub_id_fails_at_once_in_one_line(unreachable, tmp_path, c4_file):
    t = time.perf_counter()
    res = CliRunner().invoke(cli, ["calibrate", "--model", "acme/not-cached", "--data", c4_file,
                                   "--device", "cpu", "--run", str(tmp_path / "run")])
    assert time.perf_counter() - t < 30
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert "'acme/not-cached' is not in the local Hugging Face cache" in lines[0]
    assert "cannot be reached" in lines[0] and "local model folder" in lines[0]
    assert unreachable == [], "tried the network"


def test_cached_hub_id_loads_from_the_cache(unreachable, tmp_path, tiny_llama_dir):
    from quantcal.models import load_model

    _cache(tiny_llama_dir, "acme/tiny", tmp_path / "hub")
    model, tokenizer = load_model("acme/tiny")
    assert model.config.model_type == "llama" and tokenizer.eos_token
    assert unreachable == [], "tried the network"
