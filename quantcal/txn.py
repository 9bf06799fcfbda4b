"""Stages as transactions over a run directory: a lock, a staging folder, a journalled commit.

A stage that writes takes the run directory's lock (``RUN/.lock``, an advisory ``flock``
released by the OS however the process ends), writes every file into its own staging folder
(``RUN/.staging/<stage>/``) and, only when the whole set is complete and verified, promotes
it. Promotion is journalled: the list of files to move in and to delete is written
atomically to ``COMMIT.json`` inside the staging folder *before* anything in the run
directory changes; then the moves run. A process killed during the moves leaves the journal,
and the next quantcal command on that directory rolls it forward (:func:`recover`) before it
reads anything. So every reader sees either the previous committed set or the new one.

A failed or interrupted stage leaves the run directory's files untouched. Its staging
folder is either discarded, or kept as a checkpoint (calibration: statistics, qparams,
sensitivity) that a re-run with the same inputs resumes from.

Writes outside a run directory (``export -o elsewhere/model.onnx``) use the same staging and
journal in the target folder (``elsewhere/.quantcal-staging/``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterable

from quantcal.errors import QuantcalError

LOCK = ".lock"
STAGING = ".staging"
JOURNAL = "COMMIT.json"
HOLDER = "holder.json"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def apply_journal(staging: Path, target: Path) -> None:
    """Carry out (or finish) a journalled commit; idempotent, so a kill in the middle of it
    and a second call end in the same state."""
    if (staging / JOURNAL).is_file():  # else: done, only the folder is left to remove
        journal = json.loads((staging / JOURNAL).read_text(encoding="utf-8"))
        for name in journal["remove"]:
            with contextlib.suppress(FileNotFoundError):
                (target / name).unlink()
        for name in journal["move"]:
            src = staging / name
            if src.exists():
                os.replace(src, target / name)
        _fsync_dir(target)
        for rest in staging.iterdir():  # checkpoints of the committed stage go before the
            if rest.name != JOURNAL:    # journal does, so nothing of them is ever resumed
                shutil.rmtree(rest) if rest.is_dir() else rest.unlink()
        with contextlib.suppress(FileNotFoundError):
            (staging / JOURNAL).unlink()
    shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):
        staging.parent.rmdir()  # only when empty


def _pending(root: Path) -> list[tuple[Path, Path]]:
    """Staging folders under ``root`` with a journal to roll forward, and their targets."""
    out = []
    for staging_root, target in ((root / STAGING, root), (root / ".quantcal-staging", root)):
        if staging_root.is_dir():
            out += [(d, target) for d in sorted(staging_root.iterdir())
                    if (d / JOURNAL).is_file()]
    return out


def recover(root: str | os.PathLike) -> bool:
    """Roll forward any commit a killed process left half done in ``root``.

    Takes the lock without waiting; when a live writer holds it, its own commit is in
    flight and nothing is touched. Returns whether anything was rolled forward.
    """
    root = Path(root)
    if not root.is_dir() or not _pending(root):
        return False
    try:
        with RunLock(root, "recover"):
            for staging, target in _pending(root):
                apply_journal(staging, target)
    except QuantcalError:
        return False
    return True


class RunLock:
    """An exclusive advisory lock on a folder (``<folder>/.lock``), held while a stage
    writes. A second writer gets one line naming the holder."""

    def __init__(self, root: Path, stage: str, *, wait: bool = False):
        self.root, self.stage, self.wait = Path(root), stage, wait
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except OSError as exc:
            os.close(self.fd)
            self.fd = None
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise QuantcalError(
                f"run directory {self.root} is in use by {self._holder()}; wait for it to "
                "finish or choose another --run") from None
        with contextlib.suppress(OSError):
            _write_json_atomic(self.root / f".{HOLDER}", {
                "stage": self.stage, "pid": os.getpid(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        return self

    def _holder(self) -> str:
        try:
            info = json.loads((self.root / f".{HOLDER}").read_text(encoding="utf-8"))
            return f"`quantcal {info['stage']}` (pid {info['pid']}, since {info['since']})"
        except (OSError, ValueError, KeyError):
            return "another quantcal command"

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                (self.root / f".{HOLDER}").unlink()
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class Stage:
    """One stage's staging folder in ``root`` and its commit.

    Use inside a :class:`RunLock` on ``root``. ``keep=True`` keeps the folder as a
    checkpoint when the stage fails (a later ``Stage(..., resume=True)`` finds it); otherwise
    it is discarded.
    """

    def __init__(self, root: Path, name: str, *, staging_root: str = STAGING,
                 resume: bool = False):
        self.root = Path(root)
        self.dir = self.root / staging_root / name
        self.keep = False
        if self.dir.exists() and not resume:
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def file(self, name: str) -> Path:
        return self.dir / name

    def commit(self, move: Iterable[str], remove: Iterable[str] = ()) -> None:
        """Promote ``move`` (files in the staging folder) into ``root`` and delete
        ``remove`` there, as one journalled step."""
        move = [m for m in move if (self.dir / m).exists()]
        remove = [r for r in remove if r not in move]
        _write_json_atomic(self.dir / JOURNAL, {"move": move, "remove": remove})
        # from here on the commit is decided: a Ctrl-C in the middle of the moves is held
        # back until they are done (they take milliseconds), so the stage ends committed
        try:
            apply_journal(self.dir, self.root)
        except KeyboardInterrupt:
            apply_journal(self.dir, self.root)

    def discard(self) -> None:
        """Drop the staging folder, unless it holds a decided commit: that is finished."""
        if (self.dir / JOURNAL).is_file():
            apply_journal(self.dir, self.root)
            return
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.dir.parent.rmdir()  # only when empty

    def set_aside(self, where: Path) -> None:
        """Keep a failed stage's files for inspection at ``where`` (replacing older ones)."""
        if where.exists():
            shutil.rmtree(where)
        os.replace(self.dir, where)
        with contextlib.suppress(OSError):
            self.dir.parent.rmdir()
