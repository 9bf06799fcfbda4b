"""Shared test fixtures: real text from ../shared/data, a tiny tokenizer trained on it, and
tiny random models of the Llama, Qwen2 and GPT-2 families built from configs (no hub).

Everything runs on CPU. Nothing here downloads: the HF hub and datasets are forced offline.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import torch

from tinymodels import FAMILIES, build_tiny_model, build_tiny_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("QUANTCAL_TEST_DATA", REPO.parent / "shared" / "data"))
C4_JSONL = SHARED_DATA / "c4" / "c4_validation_2k.jsonl.gz"

def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set QUANTCAL_TEST_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def c4_texts(shared_data: Path) -> list[str]:
    with gzip.open(shared_data / "c4" / "c4_validation_2k.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="session")
def tiny_tokenizer(c4_texts: list[str]):
    return build_tiny_tokenizer(c4_texts[:300])


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
