"""The data the repo ships: tests/data (the tests' sample, laid out like shared/data) and
quantcal/data (the packaged C4 calibration sample). Small, with their licence notes, and,
where the full shared/data is present, exactly the rows of it that their READMEs name."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from tinymodels import build_tiny_tokenizer, load_tiny_tokenizer

from quantcal.textdata import PACKAGED_C4

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data"
HELLASWAG = "hellaswag/hellaswag_val.llamacpp_derived.jsonl.gz"
HELLASWAG_ITEMS = (*range(40), 3505, 4016, 4041, 5592)
PREFIXES = {"c4/c4_validation_2k.jsonl.gz": 120, "wikitext2/wiki.test.raw": 120,
            "gsm8k/test.jsonl": 20, "gsm8k/train.jsonl": 60}


def _lines(path: Path) -> list[bytes]:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return raw.splitlines(keepends=True)


def test_the_shipped_data_is_small_and_licensed():
    files = [p for p in SAMPLE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 300_000
    assert PACKAGED_C4.stat().st_size < 400_000
    notes = (SAMPLE / "README.md").read_text() + (PACKAGED_C4.parent / "README.md").read_text()
    for licence in ("ODC-BY 1.0", "CC BY-SA 3.0", "MIT"):
        assert licence in notes
    assert "MIT License" in (SAMPLE / "gsm8k" / "LICENSE").read_text()
    for rel, rows in PREFIXES.items():
        assert len(_lines(SAMPLE / rel)) == rows, rel


def test_the_samples_are_the_rows_of_the_full_data(full_data):
    for rel, rows in PREFIXES.items():
        assert _lines(SAMPLE / rel) == _lines(full_data / rel)[:rows], rel
    full = _lines(full_data / HELLASWAG)
    assert _lines(SAMPLE / HELLASWAG) == [full[i] for i in HELLASWAG_ITEMS]
    assert _lines(PACKAGED_C4) == _lines(full_data / "c4" / "c4_validation_2k.jsonl.gz")[:400]


def test_the_tokenizer_is_the_one_tinymodels_trains(full_data):
    with gzip.open(full_data / "c4" / "c4_validation_2k.jsonl.gz", "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(300), f)]
    trained = build_tiny_tokenizer(texts).backend_tokenizer.to_str()
    shipped = load_tiny_tokenizer(SAMPLE / "tokenizer" / "tokenizer.json")
    assert shipped.backend_tokenizer.to_str() == trained
