"""Shared test fixtures: the small real data the repo ships (tests/data), a tiny tokenizer
(shipped there too), and tiny random models of the Llama, Qwen2 and GPT-2 families built from
configs (no hub). Everything runs on CPU. Nothing here downloads: the HF hub and datasets
are forced offline.

Data: tests read ``tests/data`` (:data:`SAMPLE_DATA`, laid out like ``shared/data``). The
few tests that measure the full sets take the ``full_data`` fixture; they run when
``$QUANTCAL_TEST_DATA`` names such a folder (or, when it is unset, ``../shared/data`` sits
beside the clone), and otherwise (``QUANTCAL_TEST_DATA=`` forces that) are deselected at
collection with a line in the summary saying so.

No test skips for a missing file: a skip is turned into a failure unless it is the GPU
mark's skip (no CUDA) or a test's own ``pytest.skip`` during its call whose reason is not
about something missing (a parametrisation that does not apply); allowed skips are listed
in the summary.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import pytest
import torch

from tinymodels import FAMILIES, build_tiny_model, load_tiny_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "tests" / "data"
C4_SAMPLE = SAMPLE_DATA / "c4" / "c4_validation_2k.jsonl.gz"
TOKENIZER = SAMPLE_DATA / "tokenizer" / "tokenizer.json"
FULL_ENV = "QUANTCAL_TEST_DATA"
NO_GPU = "no CUDA GPU on this machine"
# words of a skip reason that mean "something is missing": never allowed
MISSING = re.compile(r"not found|missing|no such|does not exist|not installed|could not import|"
                     r"set \$?QUANTCAL|shared/data|data folder", re.IGNORECASE)
_FULL = pytest.StashKey[Path | None]()  # the full data folder, None when there is none
_LEFT_OUT = pytest.StashKey[list]()  # node ids of full_data tests deselected
_ALLOWED = pytest.StashKey[list]()  # "node id: reason" of the skips let through


def full_data_dir() -> Path | None:
    """$QUANTCAL_TEST_DATA (which must be a folder; set empty: none), else ../shared/data
    if present."""
    named = os.environ.get(FULL_ENV)
    if named == "":
        return None
    if named is not None:
        if not Path(named).is_dir():
            raise pytest.UsageError(f"{FULL_ENV}={named} is not a folder; point it at a "
                                    "folder laid out like shared/data, or unset it")
        return Path(named)
    beside = REPO.parent / "shared" / "data"
    return beside if beside.is_dir() else None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "full_data: needs the full shared/data (added by "
                                       "conftest to tests that take the full_data fixture)")
    config.stash[_FULL] = full_data_dir()
    config.stash[_LEFT_OUT] = []
    config.stash[_ALLOWED] = []


def pytest_report_header(config: pytest.Config) -> str:
    full = config.stash[_FULL]
    return (f"test data: {SAMPLE_DATA}; full data: "
            f"{full if full else f'none (set {FULL_ENV} to run the full_data tests)'}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason=NO_GPU)
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
        if "full_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.full_data)
    if config.stash[_FULL] is None:
        left = [i for i in items if "full_data" in i.keywords]
        if left:
            config.hook.pytest_deselected(items=left)
            items[:] = [i for i in items if "full_data" not in i.keywords]
            config.stash[_LEFT_OUT].extend(i.nodeid for i in left)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """Fail any skip but the GPU mark's and a test's own not-applicable skip."""
    report = yield
    if not report.skipped or hasattr(report, "wasxfail"):
        return report
    reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
    gpu = "gpu" in item.keywords and NO_GPU in reason
    own = call.when == "call" and not MISSING.search(reason)
    if gpu or own:
        item.config.stash[_ALLOWED].append(f"{item.nodeid}: {reason}")
        return report
    report.outcome = "failed"
    report.longrepr = (f"skipped ({reason}), but quantcal's tests may not skip for a missing "
                       "file, folder or package: ship what the test needs in tests/data or "
                       "take the full_data fixture")
    return report


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    left, allowed = config.stash[_LEFT_OUT], config.stash[_ALLOWED]
    if left:
        terminalreporter.write_line(
            f"quantcal: {len(left)} full_data tests not run (no full data: set {FULL_ENV} "
            f"to a folder laid out like shared/data to run them)")
    gpu = sum(NO_GPU in a for a in allowed)
    if gpu:
        terminalreporter.write_line(f"quantcal: {gpu} gpu tests skipped ({NO_GPU})")
    for line in (a for a in allowed if NO_GPU not in a):
        terminalreporter.write_line(f"quantcal: skipped, not applicable: {line}")


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """The data the repo ships: a folder laid out like shared/data, a few rows a file."""
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def full_data(request) -> Path:
    """The full shared/data (tests taking it are deselected when there is none)."""
    return request.config.stash[_FULL]


@pytest.fixture(scope="session")
def c4_file() -> str:
    """The shipped C4 sample's path, for ``--data``."""
    return str(C4_SAMPLE)


@pytest.fixture(scope="session")
def c4_texts() -> list[str]:
    with gzip.open(C4_SAMPLE, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 512-token byte-level BPE, trained by tinymodels.build_tiny_tokenizer on the first 300
    C4 documents of shared/data (tests/test_sample_data.py checks it)."""
    return load_tiny_tokenizer(TOKENIZER)


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_model_dir(request, tmp_path_factory, tiny_tokenizer) -> Path:
    """A local HF folder (weights + tokenizer) of a tiny random model, one per family."""
    out = tmp_path_factory.mktemp(f"tiny-{request.param}")
    build_tiny_model(request.param).save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A local HF folder of a tiny random Llama, for tests that need one family only."""
    out = tmp_path_factory.mktemp("tiny-llama-only")
    build_tiny_model("llama").save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out
