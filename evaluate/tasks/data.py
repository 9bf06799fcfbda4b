"""Where task documents come from: a local folder laid out like ``shared/data``
(``data_dir``, else ``$QUANTCAL_DATA_DIR``), else the Hugging Face hub through
``datasets``. Reads .jsonl, .jsonl.gz, .parquet and raw WikiText files (as the hub's rows,
joined) through :mod:`quantcal.textdata`; writes nothing. The perplexity corpora are opened
by :mod:`quantcal.textdata` itself, which calibration shares. A failure the user can fix
(no such folder, hub offline or unreachable) is a QuantcalError that says to pass
--data-dir or set $QUANTCAL_DATA_DIR.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantcal.datadir import DATA_DIR_ENV, find_local, hub_access
from quantcal.errors import QuantcalError
from quantcal.textdata import read_local


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
    path, missing = find_local(source.local, data_dir, "--data-dir")
    return read_local(path) if path is not None else _hub_rows(source, missing)


def _hub_rows(source: Source, missing: str) -> list[dict]:
    import datasets

    def fail(why: str) -> QuantcalError:
        return QuantcalError(
            f"could not load {source.label} from the Hugging Face hub ({why}); {missing}pass "
            f"--data-dir DIR or set {DATA_DIR_ENV} to a folder laid out like shared/data "
            f"({', '.join(source.local)})")

    offline, unusable = hub_access()
    if unusable:
        raise fail(unusable)
    streaming = source.stream_rows is not None and not offline  # no streams from the cache
    try:
        rows = datasets.load_dataset(**source.hub, streaming=streaming)
        if source.stream_rows is not None:
            return [dict(r) for _, r in zip(range(source.stream_rows), rows)]
        return [dict(r) for r in rows]
    except Exception as exc:  # offline, not cached, network, auth: all mean the same here
        raise fail(f"{type(exc).__name__}: {exc}") from exc
