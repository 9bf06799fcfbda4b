"""Strict versioned records and the run directory: schema round-trips, rejection of
unknown keys and other schema versions, atomic writes, clear errors for corrupt files."""

from __future__ import annotations

import json
import os

import pytest
import torch

from quantcal.config import (
    SCHEMA_VERSION, Budget, CalibrateConfig, LayerInfo, LayerPlan, Plan, RunRecord,
)
from quantcal.errors import QuantcalError
from quantcal.formats import FP16, Int4, Int8
from quantcal.rundir import (
    PLAN, QPARAMS, RUN_JSON, RunDir, atomic_path, atomic_write_json, save_tensors,
)


def _record() -> RunRecord:
    return RunRecord(
        config=CalibrateConfig(model="/models/tiny", samples=16, seq_len=64, data="c4"),
        layers={"model.layers.0.mlp.down_proj": LayerInfo("linear", 128, 64, block=0),
                "lm_head": LayerInfo("linear", 64, 512)},
        versions={"torch": torch.__version__}, timings={"forward_s": 1.5}, created="now",
    )


def _plan() -> Plan:
    return Plan(
        model="/models/tiny",
        layers={"a.q_proj": LayerPlan(Int4(128), bits=4.16, bytes=1000, score=0.01,
                                      reason="budget"),
                "lm_head": LayerPlan(FP16(), bits=16, bytes=4096, reason="rule")},
        budget=Budget("target_bits", 4.5), totals={"bits": 4.5}, predicted_size_bytes=5096,
    )


def test_records_round_trip_through_json():
    for rec in (_record(), _plan()):
        data = json.loads(json.dumps(rec.to_dict()))
        assert data["schema_version"] == SCHEMA_VERSION
        assert type(rec).from_dict(data) == rec


def test_formats_serialize_as_names():
    d = _plan().to_dict()
    assert d["layers"]["a.q_proj"]["format"] == "int4-g128"
    cfg = CalibrateConfig(model="m").to_dict()
    assert cfg["formats"] == ["int8", "int4-g128", "int4-g32"]
    assert CalibrateConfig.from_dict(cfg).formats == (Int8(), Int4(128), Int4(32))


@pytest.mark.parametrize("mutate, words", [
    (lambda d: d.update(extra=1), ["unknown key 'extra'"]),
    (lambda d: d["layers"]["a.q_proj"].update(colour="red"), ["unknown key 'colour'"]),
    (lambda d: d.update(schema_version=SCHEMA_VERSION + 1), ["schema version"]),
    (lambda d: d.pop("schema_version"), ["schema version None"]),
    (lambda d: d["layers"]["a.q_proj"].update(format="int5"), ["unknown format 'int5'"]),
    (lambda d: d["budget"].update(kind="vibes"), ["unknown budget kind"]),
    (lambda d: d.pop("model"), ["missing key 'model'"]),
    (lambda d: d.update(predicted_size_bytes="big"), ["expected int"]),
])
def test_plan_rejects_bad_input(mutate, words):
    data = _plan().to_dict()
    mutate(data)
    with pytest.raises(QuantcalError) as exc:
        Plan.from_dict(data)
    for w in words:
        assert w in str(exc.value)


@pytest.mark.parametrize("kwargs, word", [
    ({"samples": 0}, "--samples"), ({"seq_len": -1}, "--seq-len"),
    ({"dtype": "float8"}, "dtype"), ({"device": "tpu"}, "device"),
])
def test_calibrate_config_validates(kwargs, word):
    with pytest.raises(QuantcalError, match=word):
        CalibrateConfig(model="m", **kwargs)


def test_run_dir_round_trip(tmp_path):
    run = RunDir(tmp_path / "run")
    atomic_write_json(run.file(RUN_JSON), _record())
    atomic_write_json(run.file(PLAN), _plan())
    assert run.read_run() == _record()
    assert run.read_plan() == _plan()
    tensors = {"a.scale": torch.rand(4, 2), "a.zero": torch.zeros(4, 2)}
    save_tensors(run.file(QPARAMS), tensors, kind="qparams", metadata={"observer": "mse"})
    back, meta = run.load_tensors(QPARAMS, kind="qparams")
    assert meta["observer"] == "mse" and meta["schema_version"] == str(SCHEMA_VERSION)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    assert sorted(p.name for p in run.path.iterdir()) == sorted([RUN_JSON, PLAN, QPARAMS])
    mask = os.umask(0)
    os.umask(mask)
    for p in run.path.iterdir():  # ordinary permissions, not mkstemp's 0600
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask


def test_missing_and_corrupt_files_give_clear_errors(tmp_path):
    with pytest.raises(QuantcalError, match="quantcal calibrate"):
        RunDir(tmp_path / "nowhere").read_run()
    run = RunDir(tmp_path)
    with pytest.raises(QuantcalError, match="plan.json not found"):
        run.read_plan()
    run.file(PLAN).write_text('{"schema_version": 2, "model": ')
    with pytest.raises(QuantcalError, match="corrupted"):
        run.read_plan()
    run.file(QPARAMS).write_bytes(b"\x00garbage")
    with pytest.raises(QuantcalError, match="corrupted"):
        run.load_tensors(QPARAMS, kind="qparams")
    save_tensors(run.file(QPARAMS), {"x": torch.zeros(1)}, kind="stats")
    with pytest.raises(QuantcalError, match="expected kind='qparams'"):
        run.load_tensors(QPARAMS, kind="qparams")


def test_atomic_write_leaves_old_file_on_interrupt(tmp_path):
    target = tmp_path / "plan.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "half')
            raise KeyboardInterrupt
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
