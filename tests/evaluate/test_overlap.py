"""Calibration and evaluation text never meet unnoticed: run.json names the documents that
calibration read, and perplexity on any of them is refused unless --allow-overlap, which
records the overlap in eval.json. A local C4 sample is split between the stages, so
calibrating and evaluating on it does not overlap by default.

CPU only, no network: a fake backend scores windows, the data layer is the real one.
"""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from quantcal.calibrate.data import read_calibration
from quantcal.config import CalibrateConfig, RunRecord
from quantcal.errors import QuantcalError
from quantcal.evaluate.evaluator import evaluate_variant, read_eval
from quantcal.rundir import RUN_JSON, RunDir, atomic_write_json


class FakeBackend:
    """Every token has log-probability 0: only which windows are scored matters here."""
    name = "fake"
    max_length = 64

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def token_logprobs(self, ids):
        return torch.zeros(len(ids) - 1)


@pytest.fixture
def data_dir(tmp_path, c4_texts, monkeypatch):
    monkeypatch.delenv("QUANTCAL_DATA_DIR", raising=False)
    folder = tmp_path / "data"
    (folder / "c4").mkdir(parents=True)
    with gzip.open(folder / "c4" / "c4_validation_2k.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in c4_texts[:40])
    (folder / "wikitext2").mkdir()
    raw = "".join(f" = T{i} = \r\n \r\n {t[:300]}\r\n \r\n" for i, t in enumerate(c4_texts[:8]))
    (folder / "wikitext2" / "wiki.test.raw").write_bytes(raw.encode())
    return folder


def _calibrated(tmp_path, spec, tokenizer, data_dir) -> RunDir:
    """A run directory whose run.json records what calibrating on ``spec`` read."""
    _, _, source = read_calibration(spec, tokenizer, seq_len=32, samples=6, seed=0,
                                    holdout=2, data_dir=data_dir)
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    atomic_write_json(run.file(RUN_JSON), RunRecord(config=CalibrateConfig(model="m", data=spec),
                                                    data_source=source))
    return run


def _eval(run, task, tokenizer, data_dir, **kw):
    return evaluate_variant("v", FakeBackend(tokenizer), [task], run, data_dir=data_dir,
                            limit=None, sample=None, seed=0, seq_len=32, progress=False, **kw)


def test_wikitext2_test_read_by_calibration_is_refused(tmp_path, tiny_tokenizer, data_dir):
    run = _calibrated(tmp_path, "wikitext2", tiny_tokenizer, data_dir)  # no train file here
    assert run.read_run().data_source.split == "test"
    with pytest.raises(QuantcalError) as info:
        _eval(run, "wikitext2", tiny_tokenizer, data_dir)
    msg = str(info.value)
    assert "\n" not in msg and "1 of its 1 documents" in msg and "--allow-overlap" in msg
    assert not run.has("eval.json")
    _eval(run, "wikitext2", tiny_tokenizer, data_dir, allow_overlap=True)
    variant = read_eval(run).variants["v"]
    assert variant.overlap == {"wikitext2": {"documents": 1, "overlapping": 1}}
    assert variant.metrics["wikitext2"]["perplexity"][0] == pytest.approx(1.0)


def test_local_c4_sample_is_split_between_the_stages(tmp_path, tiny_tokenizer, data_dir):
    run = _calibrated(tmp_path, "c4", tiny_tokenizer, data_dir)
    source = run.read_run().data_source
    assert (source.first_doc, source.docs_read) == (0, 20) and source.digests
    _eval(run, "c4", tiny_tokenizer, data_dir)  # the second half: nothing calibration read
    assert read_eval(run).variants["v"].overlap == {}


def test_calibrating_on_the_whole_file_overlaps_c4(tmp_path, tiny_tokenizer, data_dir):
    whole = data_dir / "c4" / "c4_validation_2k.jsonl.gz"
    run = _calibrated(tmp_path, str(whole), tiny_tokenizer, data_dir)
    with pytest.raises(QuantcalError, match=r"c4: \d+ of its 20 documents .*--allow-overlap"):
        _eval(run, "c4", tiny_tokenizer, data_dir)
    _eval(run, "c4", tiny_tokenizer, data_dir, allow_overlap=True)
    overlap = read_eval(run).variants["v"].overlap["c4"]
    assert overlap["documents"] == 20 and 1 <= overlap["overlapping"] <= 20


def test_runs_without_a_record_are_not_checked(tmp_path, tiny_tokenizer, data_dir):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    _eval(run, "c4", tiny_tokenizer, data_dir)
    assert read_eval(run).variants["v"].overlap == {}
