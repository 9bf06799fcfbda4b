"""Where task documents come from: a local folder laid out like ``shared/data``
(``data_dir``, else ``$QUANTCAL_DATA_DIR``), else the Hugging Face hub through
``datasets``. Reads .jsonl, .jsonl.gz, .parquet and raw text files; writes nothing. A
failure the user can fix (no such folder, hub offline or unreachable) is a QuantcalError
that says to pass --data-dir or set $QUANTCAL_DATA_DIR.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantcal.errors import QuantcalError

DATA_DIR_ENV = "QUANTCAL_DATA_DIR"


@dataclass(frozen=True)
class Source:
    """Where one split's rows live: files under a local data folder (the first one present
    wins) and the ``datasets.load_dataset`` arguments of the hub copy."""
    label: str
    local: tuple[str, ...]
    hub: Mapping[str, Any] = field(hash=False)
    stream_rows: int | None = None  # stream the hub copy and keep this many rows


def load_rows(source: Source, data_dir: Path | None = None) -> list[dict]:
    """All rows of ``source``, from ``data_dir`` (or $QUANTCAL_DATA_DIR) when it holds one of
    its files, else from the hub; a user-fixable failure is a QuantcalError."""
    root, origin = (Path(data_dir), "--data-dir") if data_dir is not None else (None, "")
    if root is None and os.environ.get(DATA_DIR_ENV):
        root, origin = Path(os.environ[DATA_DIR_ENV]), f"${DATA_DIR_ENV}"
    missing = ""
    if root is not None:
        root = root.expanduser()
        if not root.is_dir():
            raise QuantcalError(f"{origin} {root} is not a folder; point it at a folder "
                                "laid out like shared/data")
        for rel in source.local:
            if (root / rel).is_file():
                return _read_local(root / rel)
        missing = f"{origin} {root} holds no {' or '.join(source.local)}; "
    return _hub_rows(source, missing)


def _read_local(path: Path) -> list[dict]:
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if name.endswith((".raw", ".txt")):  # one document: the whole file, LF line ends
        return [{"text": path.read_bytes().decode("utf-8").replace("\r\n", "\n")}]
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        try:
            return [json.loads(line) for line in f if line.strip()]
        except json.JSONDecodeError as exc:
            raise QuantcalError(f"{path} is not JSON lines ({exc}); replace the file") from exc


def _hub_rows(source: Source, missing: str) -> list[dict]:
    import datasets

    def fail(why: str) -> QuantcalError:
        return QuantcalError(
            f"could not load {source.label} from the Hugging Face hub ({why}); {missing}pass "
            f"--data-dir DIR or set {DATA_DIR_ENV} to a folder laid out like shared/data "
            f"({', '.join(source.local)})")

    cfg = datasets.config  # HF_HUB_OFFLINE is named HF_DATASETS_OFFLINE in older releases
    offline = getattr(cfg, "HF_HUB_OFFLINE", getattr(cfg, "HF_DATASETS_OFFLINE", False))
    if not offline and any(os.environ.get(v, "").upper() in {"1", "ON", "YES", "TRUE"}
                           for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        raise fail("offline mode is set")  # set after import: `datasets` would go online
    if not offline and not _hub_reachable():
        raise fail("hub unreachable; to use a cached copy set HF_HUB_OFFLINE=1")
    streaming = source.stream_rows is not None and not offline  # no streams from the cache
    try:
        rows = datasets.load_dataset(**source.hub, streaming=streaming)
        if source.stream_rows is not None:
            return [dict(r) for _, r in zip(range(source.stream_rows), rows)]
        return [dict(r) for r in rows]
    except Exception as exc:  # offline, not cached, network, auth: all mean the same here
        raise fail(f"{type(exc).__name__}: {exc}") from exc


def _hub_reachable() -> bool:
    """Resolve the hub's host (unless a proxy does), so that a machine without network
    fails at once rather than after the hub client's retries."""
    from huggingface_hub import constants

    if urllib.request.getproxies():
        return True
    try:
        socket.getaddrinfo(urllib.parse.urlparse(constants.ENDPOINT).hostname or "", 443)
    except (OSError, UnicodeError):
        return False
    return True
