"""The run directory: the only contract between stages.

Owns the file names (``run.json``, ``stats.safetensors``, ``qparams.safetensors``,
``sensitivity.json``, ``plan.json``, ``model.onnx``, ``eval.json``, ...), atomic writes
(temporary file in the same folder, fsync, rename: an interrupted write leaves the old file
or nothing, never half a file) and checked reads: a missing, corrupted or wrong-version file
ends in one :class:`QuantcalError` that says which file and what to do.

JSON records are :class:`quantcal.config.Strict` dataclasses; tensors go to safetensors with
``schema_version`` and ``kind`` in their metadata. Never pickle.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, TypeVar

import torch

from quantcal.config import SCHEMA_VERSION, Plan, RunRecord, Strict
from quantcal.errors import QuantcalError

DEFAULT_RUN_DIR = "quantcal-out"

RUN_JSON = "run.json"
STATS = "stats.safetensors"
QPARAMS = "qparams.safetensors"
SENSITIVITY = "sensitivity.json"
PLAN = "plan.json"
MODEL = "model.onnx"
EXPORT_JSON = "export.json"
EVAL_JSON = "eval.json"
REPORT = "report.md"

# which stage writes each file, for "run X first" messages
_PRODUCER = {
    RUN_JSON: "quantcal calibrate", STATS: "quantcal calibrate", QPARAMS: "quantcal calibrate",
    SENSITIVITY: "quantcal calibrate", PLAN: "quantcal calibrate (or quantcal plan)",
    MODEL: "quantcal export", EXPORT_JSON: "quantcal export", EVAL_JSON: "quantcal eval",
}

R = TypeVar("R", bound=Strict)
_META = "quantcal"  # the safetensors metadata key holding quantcal's own metadata


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    On any exception (KeyboardInterrupt included) the temporary file is removed and
    ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _non_finite(obj: Any, where: str) -> str | None:
    """The key path of the first NaN or infinity in plain JSON data, or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where
    items = obj.items() if isinstance(obj, dict) else (
        enumerate(obj) if isinstance(obj, (list, tuple)) else ())
    for k, v in items:
        found = _non_finite(v, f"{where}.{k}" if where else str(k))
        if found:
            return found
    return None


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON (a Strict record or plain data) atomically, indented for humans.

    NaN and infinity are refused (JSON has no such numbers): the error names the key."""
    if isinstance(obj, Strict):
        obj = obj.to_dict()
    bad = _non_finite(obj, "")
    if bad is not None:
        raise QuantcalError(f"refusing to write a non-finite number into {Path(path).name} "
                            f"(at {bad}); the computation that produced it went wrong")
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, allow_nan=False)
                              + "\n").encode())


def read_json(path: str | os.PathLike, producer: str | None = None) -> Any:
    """Read a JSON file; missing or corrupt files raise a QuantcalError naming the file."""
    path = Path(path)
    if not path.is_file():
        hint = f"; run `{producer}` first" if producer else ""
        raise QuantcalError(f"{path} not found{hint}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QuantcalError(
            f"{path} is corrupted ({exc}); fix it by hand or re-create it"
            + (f" with `{producer}`" if producer else "")
        ) from None


def read_record(path: str | os.PathLike, cls: type[R], producer: str | None = None) -> R:
    """Read a versioned record, rejecting unknown keys and other schema versions."""
    data = read_json(path, producer)
    try:
        return cls.from_dict(data, where=Path(path).name)
    except QuantcalError as exc:
        raise QuantcalError(f"{path}: invalid ({exc})") from None


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], kind: str,
                 metadata: dict[str, str] | None = None) -> None:
    """Write tensors to safetensors atomically, with ``schema_version`` and ``kind``."""
    from safetensors.torch import save_file

    meta = {"schema_version": str(SCHEMA_VERSION), "kind": kind, **(metadata or {})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    # one metadata key holding sorted JSON: safetensors writes several keys in a random
    # order per process, and equal content must give equal bytes (digests, provenance)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META: json.dumps(meta, sort_keys=True)})


def load_tensors(path: str | os.PathLike, kind: str, producer: str | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file written by :func:`save_tensors`, checking kind and version."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        hint = f"; run `{producer}` first" if producer else ""
        raise QuantcalError(f"{path} not found{hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = dict(f.metadata() or {})
            meta = json.loads(raw[_META]) if _META in raw else raw
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise QuantcalError(f"{path} is corrupted ({exc}); re-create it"
                            + (f" with `{producer}`" if producer else "")) from None
    if meta.get("kind") != kind or meta.get("schema_version") != str(SCHEMA_VERSION):
        raise QuantcalError(
            f"{path}: holds kind={meta.get('kind')!r} schema_version="
            f"{meta.get('schema_version')!r}, expected kind={kind!r} schema_version="
            f"{SCHEMA_VERSION}; re-create it with this quantcal"
        )
    return tensors, meta


class RunDir:
    """A run directory: paths of its files and checked reads/writes of its records."""

    def __init__(self, path: str | os.PathLike = DEFAULT_RUN_DIR):
        self.path = Path(path)
        self._recovered = False

    def recover(self) -> None:
        """Finish a commit a killed stage left half done (once per instance), so that
        what is read next is one stage's whole set."""
        if not self._recovered:
            from quantcal.txn import recover

            recover(self.path)
            self._recovered = True

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    def has(self, name: str) -> bool:
        self.recover()
        return self.file(name).is_file()

    def require(self, name: str) -> Path:
        """The path of ``name``, or a QuantcalError saying which stage makes it."""
        if self.path.exists() and not self.path.is_dir():
            raise QuantcalError(f"--run {self.path} is a file, not a run directory; pass the "
                                "folder that `quantcal calibrate` wrote")
        if not self.path.is_dir():
            raise QuantcalError(
                f"run directory {self.path} does not exist; run `quantcal calibrate` first "
                "or pass --run DIR"
            )
        if not self.has(name):
            raise QuantcalError(
                f"{self.file(name)} not found; run `{_PRODUCER.get(name, 'quantcal calibrate')}`"
                f" on this run directory first"
            )
        return self.file(name)

    def read_run(self) -> RunRecord:
        return read_record(self.require(RUN_JSON), RunRecord, _PRODUCER[RUN_JSON])

    def read_plan(self, path: str | os.PathLike | None = None) -> Plan:
        target = Path(path) if path else self.require(PLAN)
        return read_record(target, Plan, _PRODUCER[PLAN])

    def lock(self, stage: str):
        """The run directory's writer lock (created with the folder if needed)."""
        from quantcal.txn import RunLock

        self.path.mkdir(parents=True, exist_ok=True)
        self.recover()
        return RunLock(self.path, stage)

    def load_tensors(self, name: str, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return load_tensors(self.require(name), kind, _PRODUCER.get(name))
