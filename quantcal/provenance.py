"""Provenance: digests of what each file in a run directory was made from, and the checks
that refuse files that do not belong together.

Every record a stage writes names its inputs by SHA-256 (``made_from``): ``run.json`` the
model's config and weight files and the statistics and qparams it produced; ``sensitivity.json``
and ``plan.json`` the qparams; ``export.json`` the model, qparams and plan, and the digests
of the ONNX files it describes; each ``eval.json`` entry the model file it scored. The check
functions here recompute digests and end in one :class:`QuantcalError` naming the file that
does not match and what to re-run.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Mapping

from quantcal.config import Strict
from quantcal.errors import QuantcalError

# weight and config files whose bytes decide the model's function
_MODEL_GLOBS = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.bin",
                "*.bin.index.json", "*.pt", "*.pth")
_CHUNK = 1 << 22
_cache: dict[tuple, str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """The file's SHA-256 (hex); cached in-process by (path, size, mtime, inode)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        _cache[key] = h.hexdigest()
    return _cache[key]


def model_folder(name: str, revision: str | None = None) -> Path | None:
    """The local folder holding ``name``'s files: the folder itself, or the hub cache's
    snapshot (no download); None when neither is there."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, revision=revision, local_files_only=True,
                                      allow_patterns=list(_MODEL_GLOBS)))
    except Exception:  # not in the cache, or not a valid id: nothing to fingerprint
        return None


def model_digests(name: str, revision: str | None = None) -> dict[str, str]:
    """``{file: sha256}`` of the model's config and weight files."""
    folder = model_folder(name, revision)
    if folder is None:
        return {}
    files = sorted({p for g in _MODEL_GLOBS for p in folder.glob(g) if p.is_file()})
    return {p.name: sha256_file(p) for p in files}


def check_model_unchanged(name: str, revision: str | None, recorded: Mapping[str, str],
                          where: str) -> None:
    """Refuse when the model's files are not those ``where`` was made from."""
    if not recorded:
        return
    now = model_digests(name, revision)
    if now == dict(recorded):
        return
    changed = sorted(set(now) ^ set(recorded) | {k for k in now if recorded.get(k, now[k])
                                                 != now[k]})
    raise QuantcalError(
        f"the model {name} is not the one {where} was made from ({', '.join(changed[:3])} "
        "changed since calibration); re-run `quantcal calibrate --overwrite` on it")


def check_digest(path: Path, expected: str | None, what: str, remedy: str) -> None:
    """Refuse when ``path``'s digest is not ``expected`` (the one a record names)."""
    if expected is None:
        raise QuantcalError(f"{what} does not say what it was made from (written by an older "
                            f"quantcal?); {remedy}")
    if not path.is_file():
        raise QuantcalError(f"{path} not found; {remedy}")
    if sha256_file(path) != expected:
        raise QuantcalError(f"{what} was made from another {path.name} than the one in "
                            f"{path.parent}; {remedy}")


def onnx_files(path: Path) -> list[Path]:
    """An exported model's files: the graph and, when present, its external data."""
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]


def onnx_digests(path: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in onnx_files(path)}


@dataclass(frozen=True)
class ExportRecord(Strict):
    """``export.json`` (or ``<name>.export.json`` beside an export written elsewhere): what
    was exported, from what, how well it matches torch, and the digests of its files."""

    versioned: ClassVar[bool] = True

    model: str
    provider: str
    dtype: str
    path: str
    file_bytes: int
    ops: dict[str, int] = field(default_factory=dict)
    parity: dict[str, float | None] = field(default_factory=dict)
    passed: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    made_from: dict[str, str] = field(default_factory=dict)  # model files, qparams, plan
    files: dict[str, str] = field(default_factory=dict)  # sha256 of model.onnx (+ .data)
    # sha256 of what makes the folder an onnxruntime-genai model (quantcal.export.genai)
    genai: dict[str, str] = field(default_factory=dict)
    # layers emitted as one node: {the node's layer name: member layers, in output order}
    # (quantcal.export.fusion); empty when nothing was fused or in records from before
    fused: dict[str, list[str]] = field(default_factory=dict)


def record_path(model_path: Path) -> Path:
    """Where the record of an exported model lives: ``export.json`` beside ``model.onnx``,
    ``<stem>.export.json`` beside any other name."""
    model_path = Path(model_path)
    if model_path.name == "model.onnx":
        return model_path.with_name("export.json")
    return model_path.with_name(model_path.name.removesuffix(".onnx") + ".export.json")


def verified_export(model_path: Path) -> ExportRecord:
    """The record of ``model_path`` if it says the export passed its checks and its digests
    are the files' own; otherwise one QuantcalError saying what to re-run."""
    from quantcal.rundir import read_record
    from quantcal.txn import recover

    model_path = Path(model_path)
    recover(model_path.parent)  # a commit a killed export left half done
    if not model_path.is_file():
        raise QuantcalError(f"{model_path} not found; run `quantcal export` first or pass "
                            "the path of an exported .onnx model")
    rec_path = record_path(model_path)
    remedy = "re-run `quantcal export`" + (f" -o {model_path}" if model_path.name
                                            != "model.onnx" else "")
    if not rec_path.is_file():
        raise QuantcalError(f"{model_path} has no export record ({rec_path.name} beside it), "
                            f"so nothing says it was verified; {remedy}")
    record = read_record(rec_path, ExportRecord, "quantcal export")
    if not record.passed:
        raise QuantcalError(f"{rec_path} says the export of {model_path.name} failed its "
                            f"checks; {remedy}")
    if record.files != onnx_digests(model_path):
        raise QuantcalError(f"{model_path} (or its .data) is not the file {rec_path.name} "
                            f"verified (it changed after the export); {remedy}")
    return record


def check_consistent(run) -> None:
    """Refuse a run directory whose files do not belong together: run.json, qparams,
    sensitivity, plan, the export and its record (what ``quantcal report`` summarises)."""
    from quantcal.config import Plan, SensitivityRecord
    from quantcal.rundir import (
        EXPORT_JSON, MODEL, PLAN, QPARAMS, RUN_JSON, SENSITIVITY, read_record,
    )

    record = run.read_run()
    qdigest = record.files.get(QPARAMS)
    calib = "re-run `quantcal calibrate` on this run directory"
    check_digest(run.require(QPARAMS), qdigest, str(run.file(RUN_JSON)), calib)
    if run.has(SENSITIVITY):
        sens = read_record(run.file(SENSITIVITY), SensitivityRecord)
        if sens.made_from.get(QPARAMS) != qdigest:
            raise QuantcalError(f"{run.file(SENSITIVITY)} scored other qparams than the run's; "
                                + calib)
    if run.has(PLAN):
        plan = read_record(run.file(PLAN), Plan)
        if plan.made_from.get(QPARAMS) != qdigest:
            raise QuantcalError(f"{run.file(PLAN)} was planned on other qparams than the "
                                f"run's; re-run `quantcal plan --run {run.path}`")
    if run.has(MODEL) or run.has(EXPORT_JSON):
        export = verified_export(run.file(MODEL))
        if export.made_from.get(QPARAMS) != qdigest:
            raise QuantcalError(f"{run.file(MODEL)} was exported from other qparams than the "
                                f"run's; re-run `quantcal export --run {run.path}`")
        if run.has(PLAN) and export.made_from.get(PLAN) != sha256_file(run.file(PLAN)):
            raise QuantcalError(f"{run.file(PLAN)} changed after {run.file(MODEL)} was "
                                f"exported; re-run `quantcal export --run {run.path}`")
