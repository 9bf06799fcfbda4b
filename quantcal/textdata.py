"""The named text corpora (``c4``, ``wikitext2``) that calibration and evaluation share.

One table (:data:`CORPORA`) says, for each name and stage, which split is read, which files
of a local data folder (``data_dir`` or ``$QUANTCAL_DATA_DIR``, laid out like
``shared/data``) stand for it, which documents of a local file belong to the stage, and
how the hub copy is loaded; both stages open corpora only through :func:`open_corpus`, so
one name gives one source and one text. The stages never share documents by default:

- ``c4``: calibration reads ``allenai/c4`` en *train* (streamed); evaluation reads the
  first 2000 documents of en validation. A local sample (``c4/c4_validation_2k.*``) is
  split by position: its first half calibrates, its second half is evaluated.
- ``wikitext2``: calibration reads ``wikitext-2-raw-v1`` *train*, evaluation *test*. A local
  folder gives ``wikitext2/wiki.train.raw`` to calibration and ``wiki.test.raw`` to
  evaluation; without the train file calibration falls back to the test file, which
  evaluation then refuses to score unless told to (the digests recorded in run.json).

When the hub cannot serve ``c4`` (offline, unreachable, not cached) and no local folder
holds it, the C4 validation sample packaged with quantcal (:data:`PACKAGED_C4`,
``quantcal/data``) stands in, split in halves like any local sample; the switch is logged
in one line and recorded (:attr:`DataSource.fallback`), never silent.

A raw WikiText file becomes the hub's rows exactly (:func:`wiki_rows`) and the corpus text
is ``"\\n\\n".join(rows)``, the lm-eval/HF perplexity recipe. Reads files and the hub;
writes nothing; logs the fallback.
"""

from __future__ import annotations

import re

import gzip
import hashlib
import io
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from quantcal.config import DataSource
from quantcal.datadir import DATA_DIR_ENV, find_local, hub_access
from quantcal.errors import QuantcalError

CALIBRATION, EVALUATION = "calibration", "evaluation"
C4_LOCAL = ("c4/c4_validation_2k.jsonl.gz", "c4/c4_validation_2k.parquet")
PACKAGED_C4 = Path(__file__).resolve().parent / "data" / "c4_validation_sample.jsonl.gz"
log = logging.getLogger(__name__)


class HubUnavailable(QuantcalError):
    """The hub could not serve a corpus; ``why`` says why in a few words."""

    def __init__(self, message: str, why: str) -> None:
        super().__init__(message)
        self.why = why


@dataclass(frozen=True)
class Corpus:
    """One named corpus as one stage reads it. ``half``: which half of a local file's
    documents the stage takes (0 first, 1 second, None all)."""
    name: str
    split: str
    local: tuple[str, ...]
    hub: Mapping[str, Any] = field(hash=False)
    half: int | None = None
    stream_rows: int | None = None  # stream the hub copy, keep this many rows (None: all)
    stream: bool = False  # stream the hub copy without limit (the caller stops reading)


CORPORA: dict[tuple[str, str], Corpus] = {
    ("c4", CALIBRATION): Corpus(
        "c4", "train", C4_LOCAL, {"path": "allenai/c4", "name": "en", "split": "train"},
        half=0, stream=True),
    ("c4", EVALUATION): Corpus(
        "c4", "validation", C4_LOCAL,
        {"path": "allenai/c4", "split": "validation",
         "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}},
        half=1, stream_rows=2000),
    ("wikitext2", CALIBRATION): Corpus(
        "wikitext2", "train", ("wikitext2/wiki.train.raw", "wikitext2/wiki.test.raw"),
        {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "train"}),
    ("wikitext2", EVALUATION): Corpus(
        "wikitext2", "test", ("wikitext2/wiki.test.raw",),
        {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "test"}),
}
NAMED = ("c4", "wikitext2")


def doc_digest(text: str) -> str:
    """The short sha256 a document is recorded by (16 hex digits)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def wiki_rows(raw: bytes) -> list[str]:
    """The hub's ``wikitext`` rows of a raw WikiText file: one row per line, read with
    universal newlines (CRLF and CR become LF), a non-blank line kept whole with its LF,
    a blank (or all-space) line an empty row — the ``datasets`` builder's own rule."""
    lines = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8")
    return [line if line.strip() else "" for line in lines]


def open_corpus(name: str, stage: str, data_dir: Path | None, *,
                remedy: str) -> tuple[DataSource, Iterator[str]]:
    """The source record and the documents of corpus ``name`` for ``stage``.

    Args:
        data_dir: local folder (else $QUANTCAL_DATA_DIR); the hub when neither holds it.
        remedy: what the user can pass instead, for the hub's error message.
    Returns:
        The exact source (no digests yet) and a lazy iterator of its documents (a WikiText
        split is one document: its rows joined by blank lines).
    """
    corpus = CORPORA[(name, stage)]
    path, missing = find_local(corpus.local, data_dir, "data folder")
    if path is None:
        source = DataSource(name=name, split=corpus.split, hub=dict(corpus.hub))
        try:
            return source, _hub_docs(corpus, missing, remedy)
        except HubUnavailable as exc:
            if name != "c4":
                raise
            return _packaged(corpus, stage, exc.why)
    split = _file_split(path.name, corpus.split)
    docs = _local_docs(path)
    first, last = _half(len(docs), corpus.half)
    source = DataSource(name=name, split=split, path=str(path.resolve()), first_doc=first,
                        docs_read=last - first)
    return source, iter(docs[first:last])


def _file_split(name: str, default: str) -> str:
    """The split a local file holds, from its name (``c4_validation_2k``: validation,
    whichever half of it a stage reads; ``wiki.test.raw``: test), else ``default``."""
    parts = set(re.split(r"[^a-z]+", name.lower()))
    return next((s for s in ("validation", "test", "train") if s in parts), default)


def _packaged(corpus: Corpus, stage: str, why: str) -> tuple[DataSource, Iterator[str]]:
    """The packaged C4 sample's part for ``stage``, announced once per process."""
    docs = _local_docs(PACKAGED_C4)
    first, last = _half(len(docs), corpus.half)
    _announce(stage, why, last - first)
    source = DataSource(name=corpus.name, split="validation", path=str(PACKAGED_C4),
                        first_doc=first, docs_read=last - first,
                        fallback=f"hub unusable ({why}): the packaged C4 validation sample")
    return source, iter(docs[first:last])


@lru_cache(maxsize=None)
def _announce(stage: str, why: str, docs: int) -> None:
    part = "first" if stage == CALIBRATION else "second"
    log.warning(f"quantcal: the hub cannot serve allenai/c4 ({why}); {stage} reads the {part} "
                f"half ({docs} documents) of the C4 validation sample packaged with quantcal")


def reopen(source: DataSource, *, remedy: str) -> Iterator[str]:
    """The documents of a recorded named source, from its file or the hub, in order (a
    recorded fallback reads the packaged sample, wherever quantcal is installed now)."""
    if source.path:
        path = PACKAGED_C4 if source.fallback else Path(source.path)
        if not path.is_file():
            raise QuantcalError(f"the recorded data file {source.path} is gone; pass --data "
                                f"to name the calibration text ({remedy})")
        docs = _local_docs(path)
        return iter(docs[source.first_doc:source.first_doc + source.docs_read])
    corpus = Corpus(source.name, source.split, (), source.hub, stream=source.name == "c4")
    return _hub_docs(corpus, "", remedy)


def _half(n: int, half: int | None) -> tuple[int, int]:
    if half is None:
        return 0, n
    return (0, n // 2) if half == 0 else (n // 2, n)


def _local_docs(path: Path) -> list[str]:
    if path.name.endswith(".raw"):
        return ["\n\n".join(wiki_rows(path.read_bytes()))]
    return [r.get("text") or "" for r in read_local(path)]


def read_local(path: Path) -> list[dict]:
    """The records of a local .parquet, .jsonl(.gz) or raw text file (one ``text`` row)."""
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if name.endswith((".raw", ".txt")):
        return [{"text": "\n\n".join(wiki_rows(path.read_bytes()))}]
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        try:
            return [json.loads(line) for line in f if line.strip()]
        except json.JSONDecodeError as exc:
            raise QuantcalError(f"{path} is not JSON lines ({exc}); replace the file") from exc


def hub_rows(hub: Mapping[str, Any], fail, *, stream: bool = False,
             limit: int | None = None) -> Iterator[dict]:
    """Rows of ``datasets.load_dataset(**hub)``; ``fail(why)`` builds the error raised
    when the hub cannot serve them (offline, not cached, network, a stream broken)."""
    import datasets

    offline, unusable = hub_access()
    if unusable:
        raise fail(unusable)
    streaming = (stream or limit is not None) and not offline  # no streams from the cache
    try:
        rows = datasets.load_dataset(**hub, streaming=streaming)
    except Exception as exc:  # offline, not cached, network, auth: all mean the same here
        raise fail(f"{type(exc).__name__}: {exc}") from exc
    return _guard(rows, fail, limit)


def _guard(rows, fail, limit: int | None) -> Iterator[dict]:
    try:
        for n, row in enumerate(rows):
            if limit is not None and n >= limit:
                return
            yield dict(row)
    except (OSError, ValueError) as exc:
        raise fail(f"{type(exc).__name__}: {exc}") from exc


def _hub_docs(corpus: Corpus, missing: str, remedy: str) -> Iterator[str]:
    def fail(why: str) -> QuantcalError:
        return HubUnavailable(
            f"could not load {corpus.name} ({corpus.split}) from the Hugging Face hub ({why}); "
            f"{missing}{remedy} or set {DATA_DIR_ENV} to a folder laid out like shared/data "
            f"({', '.join(corpus.local)})", _short(why))

    rows = hub_rows(corpus.hub, fail, stream=corpus.stream, limit=corpus.stream_rows)
    if corpus.name == "wikitext2":
        return iter(["\n\n".join(r["text"] for r in rows)])
    return (r["text"] for r in rows)


def _short(why: str) -> str:
    """The first line of a hub failure, at most 120 characters, for the one-line notice."""
    line = why.strip().splitlines()[0] if why.strip() else "unknown error"
    return line if len(line) <= 120 else line[:117] + "..."
