"""Tests for quantcal.calibrate.data: every input format, the real data files (tests/data;
the full shared/data where a test takes full_data), the
token windows (shape, determinism, provenance, disjoint held-out set) and every user error.

CPU only, no network: conftest forces the hub offline.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from quantcal.calibrate import data
from quantcal.calibrate.data import (
    calibration_windows, iter_texts, load_calibration_data, load_texts, pick_windows,
    read_calibration, recorded_windows, token_stream, tokens_to_read,
)
from quantcal.config import CalibrateConfig, RunRecord
from quantcal.textdata import doc_digest, wiki_rows
from quantcal.errors import QuantcalError

DOCS = ["The first document.\nIt has two lines.", "A second one.", "Third, and last."]


@pytest.fixture(autouse=True)
def _no_data_dir(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)


def _write_jsonl(path: Path, records: list, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def _error(spec: str, **kwargs) -> str:
    with pytest.raises(QuantcalError) as info:
        load_texts(spec, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------- formats


def test_txt_splits_on_blank_lines_and_normalises_crlf(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"The first document.\r\nIt has two lines.\r\n\r\n\r\nA second one."
                     b"\n  \nThird, and last.\n")
    assert load_texts(str(path)) == DOCS


@pytest.mark.parametrize("name, opener", [("d.jsonl", open), ("d.jsonl.gz", gzip.open),
                                          ("d.json.gz", gzip.open)])
def test_json_lines(tmp_path, name, opener):
    records = [{"text": t, "url": "u"} for t in DOCS] + [{"text": "   "}, {"text": None}]
    path = _write_jsonl(tmp_path / name, records, opener)
    assert load_texts(str(path)) == DOCS  # blank and null texts are skipped


@pytest.mark.parametrize("payload", [
    [{"text": t} for t in DOCS],
    {"rows": [{"text": t} for t in DOCS], "meta": "x"},
    DOCS,
])
def test_json_document(tmp_path, payload):
    (tmp_path / "d.json").write_text(json.dumps(payload, indent=2))
    assert load_texts(str(tmp_path / "d.json")) == DOCS
    with gzip.open(tmp_path / "d.json.gz", "wt") as f:
        json.dump(payload, f)  # one line: a JSON document, not JSON lines
    assert load_texts(str(tmp_path / "d.json.gz")) == DOCS


def test_json_single_object(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"text": DOCS[0]}))
    assert load_texts(str(tmp_path / "d.json")) == DOCS[:1]


def test_parquet_and_text_field(tmp_path):
    table = pa.table({"id": [1, 2, 3], "body": DOCS})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=2)
    assert load_texts(str(tmp_path / "d.parquet"), text_field="body") == DOCS
    _write_jsonl(tmp_path / "d.jsonl", [{"body": t} for t in DOCS])
    assert load_texts(str(tmp_path / "d.jsonl"), text_field="body") == DOCS


def test_folder_of_files(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", [{"text": DOCS[0]}])
    (tmp_path / "b.txt").write_text(DOCS[1] + "\n\n" + DOCS[2])
    (tmp_path / "notes.md").write_text("ignored")
    assert load_texts(str(tmp_path)) == DOCS


def test_max_chars_stops_early_and_iter_is_lazy(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "x" * 10}] * 100)
    assert len(load_texts(str(path), max_chars=25)) == 3
    texts = iter_texts(str(path))
    assert next(texts) == "x" * 10
    texts.close()


# ---------------------------------------------------------------- real data


def test_real_c4_jsonl_and_parquet_agree(sample_data, c4_texts, tmp_path):
    from_dir = load_texts("c4", data_dir=sample_data, max_chars=50_000)
    assert from_dir == c4_texts[: len(from_dir)] and len(from_dir) > 5
    only_parquet = tmp_path / "c4"
    only_parquet.mkdir()
    with gzip.open(sample_data / "c4" / "c4_validation_2k.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]  # text, url, timestamp, as the real parquet
    pq.write_table(pa.Table.from_pylist(rows), only_parquet / "c4_validation_2k.parquet")
    assert load_texts("C4", data_dir=tmp_path, max_chars=50_000) == from_dir
    direct = load_texts(str(only_parquet / "c4_validation_2k.parquet"))
    assert direct == c4_texts and len(direct) == len(rows) == 120


def test_full_c4_jsonl_and_parquet_agree(full_data):
    jsonl = load_texts(str(full_data / "c4" / "c4_validation_2k.jsonl.gz"))
    assert load_texts(str(full_data / "c4" / "c4_validation_2k.parquet")) == jsonl
    assert len(jsonl) == 2000 and load_texts("c4", data_dir=full_data) == jsonl[:1000]


def test_real_data_through_env(sample_data, c4_texts, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(sample_data))
    assert load_texts("c4", max_chars=1)[0] == c4_texts[0]


def _wikitext_crlf_normalised(folder: Path, rows: int) -> None:
    (text,) = load_texts("wikitext2", data_dir=folder)  # no train file: test, recorded
    assert "\r" not in text
    assert text.startswith(" = Robert Boulter = \n\n\n Robert Boulter is an English film")
    lines = (folder / "wikitext2" / "wiki.test.raw").read_bytes().split(b"\r\n")
    assert lines.pop() == b"" and len(lines) == rows and all(line.strip() for line in lines)
    assert text.count("\n") == rows + 2 * (rows - 1)  # these copies have no blank lines


def test_real_wikitext2_crlf_normalised(sample_data):
    _wikitext_crlf_normalised(sample_data, 120)


def test_full_wikitext2_crlf_normalised(full_data):
    _wikitext_crlf_normalised(full_data, 2891)


def test_wiki_rows_follow_the_hub_builder():
    # The `wikitext` builder reads the raw file with universal newlines; each line is a row,
    # kept with its newline unless blank (or all spaces), which becomes "".
    raw = b" \r\n = Title = \r\n \r\n First line .\r\n Second line .\r\n\r\n = = Sub = = \r\n last"
    rows = ["", " = Title = \n", "", " First line .\n", " Second line .\n", "",
            " = = Sub = = \n", " last"]
    assert wiki_rows(raw) == rows
    assert wiki_rows(raw.replace(b"\r\n", b"\n")) == rows
    assert "\n\n".join(wiki_rows(raw)) == (
        "\n\n = Title = \n\n\n\n\n First line .\n\n\n Second line .\n\n\n\n\n"
        " = = Sub = = \n\n\n last")


def test_local_wikitext2_is_the_hub_text(tmp_path):
    folder = tmp_path / "wikitext2"
    folder.mkdir()
    (folder / "wiki.train.raw").write_bytes(b" \r\n = A = \r\n \r\n Body .\r\n")
    source, texts = data._open("wikitext2", "text", tmp_path)
    assert list(texts) == ["\n\n = A = \n\n\n\n\n Body .\n"]
    assert (source.split, source.path) == ("train", str((folder / "wiki.train.raw").resolve()))


def test_local_c4_calibrates_on_its_first_half(sample_data, c4_texts):
    source, texts = data._open("c4", "text", sample_data)
    assert list(texts) == c4_texts[:60] and len(c4_texts) == 120
    # validation text, whichever half of it calibrates (it once said "train")
    assert (source.first_doc, source.docs_read, source.split) == (0, 60, "validation")
    assert source.path.endswith("c4_validation_2k.jsonl.gz") and not source.hub


def test_read_calibration_records_the_documents_it_used(c4_texts, tiny_tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in c4_texts[:30]])
    calib, held, source = read_calibration(str(path), tiny_tokenizer, seq_len=64, samples=4,
                                           seed=3, holdout=2)
    assert source.path == str(path.resolve()) and source.name == str(path)
    owner = []  # brute force: the document of every token of the stream, -1 for eos
    for i, text in enumerate(c4_texts[:30]):
        owner += ([-1] if owner else []) + [i] * len(tiny_tokenizer(text)["input_ids"])
    stream = token_stream(c4_texts[:30], tiny_tokenizer)
    docs = set()
    for window in torch.cat([calib, held]):
        w = _window_index(window[None], stream, 64)[0]
        docs.update(d for d in owner[w * 64:(w + 1) * 64] if d >= 0)
    assert source.digests == [doc_digest(c4_texts[i]) for i in sorted(docs)]


def test_recorded_windows_need_no_data_folder(sample_data, c4_file, tiny_tokenizer,
                                              monkeypatch):
    kw = dict(seq_len=32, samples=4, holdout=2, seed=1)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(sample_data))
    calib, held, source = read_calibration("c4", tiny_tokenizer, **kw)
    monkeypatch.delenv(data.DATA_DIR_ENV)  # a new shell
    config = CalibrateConfig(model="m", data="c4", samples=4, seq_len=32, seed=1,
                             sensitivity_samples=2)
    record = RunRecord(config=config, data_source=source)
    again, held_again = recorded_windows(record, tiny_tokenizer, holdout=2)
    assert torch.equal(again, calib) and torch.equal(held_again, held)
    named = recorded_windows(record, tiny_tokenizer, holdout=2,
                             data=c4_file)
    assert named[0].shape == calib.shape


# ---------------------------------------------------------------- windows


def test_token_stream_joins_documents_with_eos(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    ids = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in DOCS]
    stream = token_stream(DOCS, tiny_tokenizer, batch_size=2)
    assert stream.dtype == torch.long
    assert stream.tolist() == ids[0] + [eos] + ids[1] + [eos] + ids[2]


def test_token_stream_stops_at_budget(tiny_tokenizer):
    pulled = []

    def docs():
        for t in DOCS * 100:
            pulled.append(t)
            yield t

    full = token_stream(DOCS * 100, tiny_tokenizer)
    first = len(tiny_tokenizer(DOCS[0], add_special_tokens=False)["input_ids"])
    part = token_stream(docs(), tiny_tokenizer, max_tokens=first + 2, batch_size=4)
    assert len(pulled) == 4  # one batch, not the whole generator
    assert torch.equal(part, full[: part.numel()]) and part.numel() >= first + 2
    assert part[-1] != tiny_tokenizer.eos_token_id  # stops after a whole document


def _window_index(windows: torch.Tensor, stream: torch.Tensor, seq_len: int) -> list[int]:
    n = stream.numel() // seq_len
    rows = {tuple(r): i for i, r in enumerate(stream[: n * seq_len].view(n, seq_len).tolist())}
    return [rows[tuple(w)] for w in windows.tolist()]  # KeyError if not an aligned slice


def test_windows_shapes_determinism_and_provenance(c4_texts, tiny_tokenizer):
    texts = c4_texts[:40]
    stream = token_stream(texts, tiny_tokenizer)
    kw = dict(seq_len=64, samples=12, holdout=5)
    calib, held = calibration_windows(texts, tiny_tokenizer, seed=3, **kw)
    assert calib.shape == (12, 64) and held.shape == (5, 64)
    assert calib.dtype == held.dtype == torch.long
    again, held_again = calibration_windows(texts, tiny_tokenizer, seed=3, **kw)
    assert torch.equal(calib, again) and torch.equal(held, held_again)
    other, _ = calibration_windows(texts, tiny_tokenizer, seed=4, **kw)
    assert not torch.equal(calib, other)
    ic, ih = _window_index(calib, stream, 64), _window_index(held, stream, 64)
    assert len(set(ic)) == 12 and len(set(ih)) == 5 and not set(ic) & set(ih)


def test_pick_windows_uses_every_window_when_asked():
    stream = torch.arange(50)
    calib, held = pick_windows(stream, seq_len=10, samples=3, holdout=2, seed=0)
    got = sorted(r[0] for r in torch.cat([calib, held]).tolist())
    assert got == [0, 10, 20, 30, 40]


def test_load_calibration_data_reads_only_what_it_needs(sample_data, c4_texts, tiny_tokenizer):
    kw = dict(seq_len=32, samples=8, holdout=2)
    calib, held = load_calibration_data("c4", tiny_tokenizer, seed=0, data_dir=sample_data, **kw)
    budget = tokens_to_read(**kw)
    assert budget == 2 * 10 * 32
    read = token_stream(c4_texts, tiny_tokenizer, max_tokens=budget)
    assert budget <= read.numel() < 20_000  # whole documents up to the budget, of ~100k
    index = _window_index(torch.cat([calib, held]), read, 32)  # drawn from that prefix only
    assert len(set(index)) == 10


def test_tokens_to_read_margin():
    assert tokens_to_read(seq_len=512, samples=100, holdout=28, margin=1.5) == 98304


# ---------------------------------------------------------------- errors


def test_unknown_name_lists_choices():
    msg = _error("c5")
    assert "unknown data set 'c5'" in msg and "c4" in msg and "wikitext2" in msg
    assert ".jsonl" in msg


def test_missing_path(tmp_path):
    assert "not found" in _error(str(tmp_path / "nope.jsonl"))


def test_unsupported_extension(tmp_path):
    (tmp_path / "d.csv").write_text("text\nhello\n")
    msg = _error(str(tmp_path / "d.csv"))
    assert "unsupported file type" in msg and ".parquet" in msg


@pytest.mark.parametrize("name, content", [("e.txt", ""), ("e.txt", "\n \n\n"),
                                           ("e.jsonl", '{"text": ""}\n'), ("e.json", "[]")])
def test_empty_inputs(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    assert "no non-empty texts" in _error(str(tmp_path / name))


def test_corrupt_gzip(tmp_path):
    (tmp_path / "bad.jsonl.gz").write_bytes(b"this is not gzip at all")
    msg = _error(str(tmp_path / "bad.jsonl.gz"))
    assert "cannot read" in msg and "gzip" in msg
    whole = gzip.compress(b'{"text": "hello"}\n' * 1000)
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    assert "complete gzip" in _error(str(tmp_path / "cut.jsonl.gz"))


def test_bad_json(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    msg = _error(str(tmp_path / "d.jsonl"))
    assert "bad JSON on line 3" in msg
    (tmp_path / "d.json").write_text('[{"text": "a"},')
    assert "bad JSON" in _error(str(tmp_path / "d.json"))
    (tmp_path / "two.json").write_text(json.dumps({"a": [], "b": []}))
    assert "single list" in _error(str(tmp_path / "two.json"))


def test_bad_parquet(tmp_path):
    (tmp_path / "d.parquet").write_bytes(b"PAR1 not really")
    assert "cannot read" in _error(str(tmp_path / "d.parquet"))


def test_wrong_text_field(tmp_path):
    _write_jsonl(tmp_path / "d.jsonl", [{"id": 1, "body": "x"}])
    msg = _error(str(tmp_path / "d.jsonl"))
    assert "no field 'text'" in msg and "id, body" in msg and "--text-field body" in msg
    pq.write_table(pa.table({"id": [1], "body": ["x"]}), tmp_path / "d.parquet")
    msg = _error(str(tmp_path / "d.parquet"))
    assert "no column 'text'" in msg and "body" in msg and "--text-field" in msg
    for path in (tmp_path / "d.jsonl", tmp_path / "d.parquet"):
        assert "not text" in _error(str(path), text_field="id")


def test_bad_requests(tiny_tokenizer):
    for kw, flag in ((dict(samples=0), "--samples"), (dict(seq_len=0), "--seq-len"),
                     (dict(holdout=-1), "held-out")):
        args = dict(seq_len=8, samples=2, seed=0, holdout=0) | kw
        with pytest.raises(QuantcalError, match=flag):
            calibration_windows(DOCS, tiny_tokenizer, **args)


def test_too_few_windows(tiny_tokenizer):
    n = token_stream(DOCS, tiny_tokenizer).numel() // 8
    with pytest.raises(QuantcalError) as info:
        calibration_windows(DOCS, tiny_tokenizer, seq_len=8, samples=n, holdout=1, seed=0,
                            source="docs")
    assert f"docs yields {n} windows of 8 tokens; ask for at most {n}" in str(info.value)


def test_tokenizer_without_eos(tiny_tokenizer):
    class NoEos:
        eos_token_id = None

    with pytest.raises(QuantcalError, match="eos"):
        token_stream(DOCS, NoEos())


def test_data_dir_not_a_folder(tmp_path, monkeypatch):
    assert "not a folder" in _error("c4", data_dir=tmp_path / "missing")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "missing"))
    assert "QUANTCAL_DATA_DIR" in _error("wikitext2")
