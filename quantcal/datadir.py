"""The local data folder: a directory laid out like ``shared/data`` that stands in for the
Hugging Face hub, named by an option (``data_dir``) or by ``$QUANTCAL_DATA_DIR``.

Shared by calibration text and evaluation tasks, so both resolve and report it alike.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from quantcal.errors import QuantcalError

DATA_DIR_ENV = "QUANTCAL_DATA_DIR"


def find_local(candidates: Sequence[str], data_dir: Path | None, flag: str
               ) -> tuple[Path | None, str]:
    """The first of ``candidates`` (paths relative to the data folder) that exists.

    Args:
        data_dir: the folder given by option ``flag``; else ``$QUANTCAL_DATA_DIR``; else none.
    Returns:
        ``(path, "")`` when found; ``(None, why)`` when no folder is set (``why`` empty) or
        it lacks every candidate (``why`` says so, for the hub's error message).
    Raises:
        QuantcalError: the named folder does not exist.
    """
    root, origin = (Path(data_dir), flag) if data_dir is not None else (None, "")
    if root is None and os.environ.get(DATA_DIR_ENV):
        root, origin = Path(os.environ[DATA_DIR_ENV]), f"${DATA_DIR_ENV}"
    if root is None:
        return None, ""
    root = root.expanduser()
    if not root.is_dir():
        raise QuantcalError(f"{origin} {root} is not a folder; point it at a folder laid out "
                            "like shared/data, or unset it to use the hub")
    for rel in candidates:
        if (root / rel).is_file():
            return root / rel, ""
    return None, f"{origin} {root} holds no {' or '.join(candidates)}; "


def hub_access() -> tuple[bool, str]:
    """Whether ``datasets`` runs offline, and why the hub cannot be used (``""``: it can).

    Offline mode set after ``datasets`` was imported would still go online, so it is
    reported as unusable; an online machine without network fails at once here instead of
    after the hub client's retries (~25 s).
    """
    import datasets

    cfg = datasets.config  # HF_HUB_OFFLINE is named HF_DATASETS_OFFLINE in older releases
    offline = getattr(cfg, "HF_HUB_OFFLINE", getattr(cfg, "HF_DATASETS_OFFLINE", False))
    if offline:
        return True, ""
    if any(os.environ.get(v, "").upper() in {"1", "ON", "YES", "TRUE"}
           for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False, "offline mode is set"
    if not hub_reachable():
        return False, "hub unreachable; to use a cached copy set HF_HUB_OFFLINE=1"
    return False, ""


def hub_reachable() -> bool:
    """Resolve the hub's host (unless a proxy does the resolving)."""
    import socket
    import urllib.parse
    import urllib.request

    from huggingface_hub import constants

    if urllib.request.getproxies():
        return True
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        return False
    return True
