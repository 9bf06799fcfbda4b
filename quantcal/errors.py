"""The exception types a user can cause, and the one-line wording of OS faults.

Every stage raises :class:`QuantcalError` for bad input (unknown data set, missing model,
wrong path, impossible budget, corrupted or mixed-up run directory). The CLI catches it and
prints its message on one line, so the message itself must say what was wrong and what to
do. :class:`StageInterrupted` is a ``KeyboardInterrupt`` that says what the interrupted stage
kept (the CLI prints it and exits 130). OS faults (no space, read-only, permission) reach the
CLI as ``OSError`` and are worded by :func:`os_error_line`.
"""

from __future__ import annotations

import errno


class QuantcalError(Exception):
    """An error the user can fix; its message says how."""


class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during a stage; the message says what the run directory keeps."""


_REMEDY = {
    errno.ENOSPC: "free some space or choose another --run / -o",
    errno.EDQUOT: "free some space or choose another --run / -o",
    errno.EROFS: "the file system is read-only; choose another --run / -o",
    errno.EACCES: "check the folder's permissions or choose another --run / -o",
    errno.EPERM: "check the folder's permissions or choose another --run / -o",
}


def os_error_line(exc: OSError) -> str:
    """One line for an OS fault: which file, what the OS said, what to do."""
    where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
    what = exc.strerror or str(exc) or type(exc).__name__
    remedy = _REMEDY.get(exc.errno, "check the path and try again")
    return (f"cannot write or read{where}: {what}; {remedy} "
            "(the run directory keeps its previous files)")
