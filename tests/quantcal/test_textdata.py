"""quantcal.textdata and the hub: the one-line errors when the hub cannot serve a named set,
and the C4 sample packaged with quantcal standing in for an unreachable hub (split into
disjoint calibration and evaluation halves, announced in one line, recorded in run.json).

CPU only, no network: conftest forces the hub offline; tests that need the hub "online"
point it at an address that does not resolve.
"""

from __future__ import annotations

import gzip
import json
import logging
import time

import pytest
from click.testing import CliRunner

from quantcal import textdata
from quantcal.calibrate import data
from quantcal.calibrate.data import load_texts, read_calibration
from quantcal.cli import cli
from quantcal.errors import QuantcalError
from quantcal.evaluate.evaluator import check_overlap
from quantcal.rundir import RunDir
from quantcal.textdata import CALIBRATION, EVALUATION, PACKAGED_C4, doc_digest, open_corpus


@pytest.fixture(autouse=True)
def _no_data_dir(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    textdata._announce.cache_clear()


def _packaged_docs() -> list[str]:
    with gzip.open(PACKAGED_C4, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def _hub_error(spec: str, **kwargs) -> str:
    start = time.perf_counter()
    try:
        load_texts(spec, max_chars=1, **kwargs)
    except QuantcalError as exc:
        assert time.perf_counter() - start < 5, "offline failure must be fast"
        return str(exc)
    pytest.skip(f"{spec} is in this machine's HF cache")


def _fallback(stage: str = CALIBRATION) -> str:
    start = time.perf_counter()
    source, docs = open_corpus("c4", stage, None, remedy="pass --data PATH")
    assert time.perf_counter() - start < 5, "the fallback must be fast"
    assert source.path == str(PACKAGED_C4) and list(docs)
    return source.fallback


def _go_online(monkeypatch, endpoint: str = "https://hub.invalid") -> None:
    import urllib.request

    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(urllib.request, "getproxies", dict)


def test_offline_hub_says_what_to_do(tmp_path):
    msg = _hub_error("wikitext2")
    assert "Hugging Face hub" in msg and "--data PATH" in msg
    assert "QUANTCAL_DATA_DIR" in msg and "shared/data" in msg
    msg = _hub_error("wikitext2", data_dir=tmp_path)  # a folder without the data set
    assert str(tmp_path) in msg and "holds no" in msg


def test_offline_set_after_import_is_not_ignored(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "offline mode" in _hub_error("wikitext2")
    assert "offline mode" in _fallback()


def test_unreachable_hub_fails_fast(monkeypatch):
    _go_online(monkeypatch)
    assert "unreachable" in _hub_error("wikitext2")
    assert "unreachable" in _fallback(EVALUATION)


def test_packaged_c4_halves_are_disjoint_and_announced_once(caplog, tmp_path):
    docs = _packaged_docs()
    assert len(docs) == 400
    with caplog.at_level(logging.WARNING, logger="quantcal.textdata"):
        calib, calib_docs = open_corpus("c4", CALIBRATION, None, remedy="r")
        evaluation, eval_docs = open_corpus("c4", EVALUATION, tmp_path, remedy="r")
        open_corpus("c4", CALIBRATION, None, remedy="r")  # announced once per stage
    assert list(calib_docs) == docs[:200] and list(eval_docs) == docs[200:]
    assert (calib.first_doc, calib.docs_read, evaluation.first_doc) == (0, 200, 200)
    assert calib.split == evaluation.split == "validation" and not calib.hub
    assert calib.fallback.startswith("hub unusable (") and "packaged" in calib.fallback
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert "calibration reads the first half (200 documents)" in lines[0]
    assert "evaluation reads the second half" in lines[1] and "packaged" in lines[1]


def test_a_local_folder_wins_over_the_packaged_sample(sample_data, caplog):
    with caplog.at_level(logging.WARNING, logger="quantcal.textdata"):
        source, _ = open_corpus("c4", CALIBRATION, sample_data, remedy="r")
    assert not source.fallback and source.path.startswith(str(sample_data))
    assert not caplog.records


def test_other_corpora_have_no_fallback():
    with pytest.raises(textdata.HubUnavailable, match="wikitext2"):
        open_corpus("wikitext2", CALIBRATION, None, remedy="r")


def test_calibrate_records_the_fallback_and_plan_rereads_it(tiny_llama_dir, tmp_path,
                                                            tiny_tokenizer):
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, [
        "calibrate", "--model", str(tiny_llama_dir), "--data", "c4", "--samples", "4",
        "--seq-len", "32", "--batch-size", "2", "--sensitivity-samples", "2", "--formats",
        "int8,int4-g32", "--target-bits", "10", "--device", "cpu", "--run", str(run)])
    assert res.exit_code == 0, res.output
    notice = [line for line in res.stderr.splitlines() if "packaged with quantcal" in line]
    assert len(notice) == 1 and notice[0].startswith("quantcal: the hub cannot serve")
    source = RunDir(run).read_run().data_source
    assert source.fallback.startswith("hub unusable (") and source.path == str(PACKAGED_C4)
    first_half = {doc_digest(d) for d in _packaged_docs()[:200]}
    assert source.digests and set(source.digests) <= first_half
    assert check_overlap("c4", RunDir(run), None, allow=False) is None  # eval: second half
    _, _, again = read_calibration("c4", tiny_tokenizer, seq_len=32, samples=4, seed=0,
                                   holdout=4)
    assert again.fallback == source.fallback
    res = CliRunner().invoke(cli, ["plan", "--run", str(run), "--target-bits", "8"])
    assert res.exit_code == 0, res.output
    assert RunDir(run).read_plan().kl_measured is not None
