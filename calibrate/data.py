"""Calibration text: where it comes from and how it becomes token windows.

Owns the ``--data`` vocabulary (``c4``, ``wikitext2`` or a path). Named corpora come from
:mod:`quantcal.textdata`, the layer evaluation reads too (calibration gets their
calibration part: C4 train, WikiText-2 train, the first half of a local C4 sample); paths
are a user's .txt, .json, .jsonl, .jsonl.gz, .json.gz or .parquet file (or a folder of
them). Text is tokenized into one stream and non-overlapping windows are picked from it by
seed; :func:`read_calibration` also returns the exact source and the digests of the
documents whose tokens entered a window (:class:`DataSource`, kept in run.json), and
:func:`recorded_windows` reads the same windows again from that record. Writes nothing.
Every error a user can cause is a :class:`QuantcalError` whose message says what to do.
"""

from __future__ import annotations

import bisect
import gzip
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import torch

from quantcal.config import DataSource
from quantcal.datadir import DATA_DIR_ENV
from quantcal.errors import QuantcalError
from quantcal.textdata import CALIBRATION, NAMED, doc_digest, open_corpus, reopen

SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet", ".txt")
TOKENS_MARGIN = 2.0
REMEDY = "pass --data PATH with a local text file"
__all__ = ["DATA_DIR_ENV", "NAMED"]


def iter_texts(spec: str, *, text_field: str = "text",
               data_dir: Path | None = None) -> Iterator[str]:
    """Lazily yield the non-empty documents of a data set or file.

    Args:
        spec: ``c4``, ``wikitext2`` (named sets win over same-named files; use ``./c4``),
            or a path to a supported file or a folder of them.
        text_field: the record field holding the text (JSON, JSON lines, parquet only).
        data_dir: local folder laid out like shared/data; defaults to $QUANTCAL_DATA_DIR.
    Returns:
        An iterator of documents. Errors in ``spec`` (unknown name, missing path, file type,
        hub) are raised at once; errors in a file's content when it is read.
    """
    return _open(spec, text_field, data_dir)[1]


def _open(spec: str, text_field: str, data_dir: Path | None
          ) -> tuple[DataSource, Iterator[str]]:
    if spec.lower() in NAMED:
        source, texts = open_corpus(spec.lower(), CALIBRATION, data_dir, remedy=REMEDY)
        label = f"{source.name} ({source.path or source.split})"
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            if "/" in spec or os.sep in spec or path.suffix:
                raise QuantcalError(f"data file not found: {spec}; check the path")
            raise QuantcalError(f"unknown data set '{spec}' and no such file: choose one of "
                                f"{', '.join(NAMED)} or a path to a {'/'.join(SUFFIXES)} file")
        source = DataSource(name=spec, path=str(path.resolve()), text_field=text_field)
        label, texts = str(path), _path_texts(path, text_field)
    return source, _nonempty(label, texts)


def load_texts(spec: str, *, text_field: str = "text", data_dir: Path | None = None,
               max_chars: int | None = None) -> list[str]:
    """:func:`iter_texts` as a list, stopped once ``max_chars`` characters are gathered
    (None: read everything). Returns the documents in source order."""
    out: list[str] = []
    with closing(iter_texts(spec, text_field=text_field, data_dir=data_dir)) as texts:
        for text in texts:
            out.append(text)
            max_chars = None if max_chars is None else max_chars - len(text)
            if max_chars is not None and max_chars <= 0:
                break
    return out


def tokens_to_read(*, seq_len: int, samples: int, holdout: int = 0,
                   margin: float = TOKENS_MARGIN) -> int:
    """Tokens to read for a request: ``margin`` times what its windows use, so that they
    are drawn from a larger pool."""
    return int(margin * (samples + holdout) * seq_len)


def token_stream(texts: Iterable[str], tokenizer, *, max_tokens: int | None = None,
                 batch_size: int = 64) -> torch.Tensor:
    """Tokenize documents (no special tokens inside) and join them with the eos token.

    Args:
        texts: documents; consumed only until ``max_tokens`` is reached.
        tokenizer: a (fast) Hugging Face tokenizer with an eos token.
        max_tokens: stop after the document that brings the count to at least this.
        batch_size: documents per tokenizer call.
    Returns:
        The token ids, (T,) int64.
    """
    return _stream_docs(texts, tokenizer, max_tokens, batch_size)[0]


def _stream_docs(texts: Iterable[str], tokenizer, max_tokens: int | None = None,
                 batch_size: int = 64) -> tuple[torch.Tensor, list[int], list[str]]:
    """:func:`token_stream`, plus where each tokenized document ends in the stream and its
    digest (documents without tokens are skipped, as in the stream)."""
    if tokenizer.eos_token_id is None:
        raise QuantcalError("the tokenizer has no eos token to separate documents with; "
                            "set tokenizer.eos_token or use the model's own tokenizer")
    sep = torch.tensor([tokenizer.eos_token_id], dtype=torch.long)
    pieces: list[torch.Tensor] = []
    ends: list[int] = []
    digests: list[str] = []
    total, it = 0, iter(texts)
    while batch := list(itertools.islice(it, batch_size)):
        encoded = tokenizer(batch, add_special_tokens=False, return_attention_mask=False,
                            verbose=False)
        for text, ids in zip(batch, encoded["input_ids"]):
            if not ids:  # skip documents with no tokens
                continue
            if pieces:
                pieces.append(sep)
                total += 1
            pieces.append(torch.tensor(ids, dtype=torch.long))
            total += len(ids)
            ends.append(total)
            digests.append(doc_digest(text))
            if max_tokens is not None and total >= max_tokens:
                return torch.cat(pieces), ends, digests
    stream = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)
    return stream, ends, digests


def pick_windows(stream: torch.Tensor, *, seq_len: int, samples: int, seed: int,
                 holdout: int = 0, source: str = "the text") -> tuple[torch.Tensor, torch.Tensor]:
    """Cut ``stream`` into non-overlapping windows and pick disjoint calibration and
    held-out windows from ``seed``.

    Args:
        stream: token ids, (T,).
        seq_len, samples, holdout: window length and how many windows of each kind.
        seed: seeds a local torch.Generator; the same inputs give the same windows.
        source: names the text in error messages.
    Returns:
        calibration windows (samples, seq_len) and held-out windows (holdout, seq_len).
    """
    _check_request(seq_len=seq_len, samples=samples, holdout=holdout)
    n = stream.numel() // seq_len
    if samples + holdout > n:
        raise QuantcalError(
            f"{source} yields {n} windows of {seq_len} tokens; ask for at most {n} "
            f"(samples + held-out; asked for {samples} + {holdout}), lower --seq-len, "
            f"or pass more text with --data PATH")
    windows = stream[: n * seq_len].reshape(n, seq_len)  # (n, seq_len)
    order = _window_order(n, seed)
    return windows[order[:samples]], windows[order[samples:samples + holdout]]


def _window_order(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _used_digests(ends: list[int], digests: list[str], picked: torch.Tensor,
                  seq_len: int) -> list[str]:
    """Digests, in stream order, of the documents that share a token with a picked window
    (a window of tokens [w*L, (w+1)*L) touches documents first..last by their ends)."""
    used: set[int] = set()
    for w in picked.tolist():
        begin, end = w * seq_len, (w + 1) * seq_len
        first = bisect.bisect_right(ends, begin)
        last = min(bisect.bisect_left(ends, end), len(ends) - 1)
        if last > 0 and ends[last - 1] + 1 >= end:  # it starts after the window (eos between)
            last -= 1
        used.update(range(first, last + 1))
    return [digests[i] for i in sorted(used)]


def calibration_windows(texts: Iterable[str], tokenizer, *, seq_len: int, samples: int,
                        seed: int, holdout: int = 0,
                        source: str = "the text") -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize ``texts`` and pick windows: :func:`token_stream` then :func:`pick_windows`.

    Returns: calibration (samples, seq_len) and held-out (holdout, seq_len) int64 tensors.
    """
    stream = token_stream(texts, tokenizer)
    return pick_windows(stream, seq_len=seq_len, samples=samples, seed=seed,
                        holdout=holdout, source=source)


def load_calibration_data(spec: str, tokenizer, *, seq_len: int, samples: int, seed: int,
                          holdout: int = 0, text_field: str = "text",
                          data_dir: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`read_calibration` without the source record."""
    windows, held, _ = read_calibration(spec, tokenizer, seq_len=seq_len, samples=samples,
                                        seed=seed, holdout=holdout, text_field=text_field,
                                        data_dir=data_dir)
    return windows, held


def read_calibration(spec: str, tokenizer, *, seq_len: int, samples: int, seed: int,
                     holdout: int = 0, text_field: str = "text", data_dir: Path | None = None,
                     source: DataSource | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, DataSource]:
    """Read ``spec`` (or the recorded ``source``) and return its calibration and held-out
    windows and the exact source with the digests of the documents they use.

    Named data sets are read only up to :func:`tokens_to_read` tokens; files are read whole.
    Args and Returns: as :func:`iter_texts` and :func:`calibration_windows`.
    """
    _check_request(seq_len=seq_len, samples=samples, holdout=holdout)
    budget = tokens_to_read(seq_len=seq_len, samples=samples, holdout=holdout)
    if source is None:
        source, texts = _open(spec, text_field, data_dir)
    else:
        texts = _reopen(source)
    named = spec.lower() in NAMED
    with closing(texts):
        stream, ends, digests = _stream_docs(texts, tokenizer, budget if named else None)
    calib, held = pick_windows(stream, seq_len=seq_len, samples=samples, seed=seed,
                               holdout=holdout, source=spec)
    picked = _window_order(stream.numel() // seq_len, seed)[:samples + holdout]
    used = _used_digests(ends, digests, picked, seq_len)
    return calib, held, replace(source, digests=used)


def recorded_windows(record, tokenizer, *, holdout: int, data: str | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration and held-out windows of a run (``record``: its run.json; ``holdout``:
    as many held-out windows as calibration asked for), read again from the source it
    records (no data folder needed: a local file is named by its path), or from ``data``
    (a ``--data`` spec) when given; runs without a record read ``config.data``."""
    cfg = record.config
    recorded = record.data_source if data is None else None
    windows, held, _ = read_calibration(
        data or cfg.data, tokenizer, seq_len=cfg.seq_len, samples=cfg.samples, seed=cfg.seed,
        holdout=holdout, text_field=cfg.text_field, source=recorded)
    return windows, held


def _reopen(source: DataSource) -> Iterator[str]:
    if source.name.lower() in NAMED:
        return _nonempty(source.name, reopen(source, remedy=REMEDY))
    path = Path(source.path)
    if not path.exists():
        raise QuantcalError(f"the recorded calibration data {source.path} is gone; pass "
                            "--data PATH naming the calibration text")
    return _nonempty(str(path), _path_texts(path, source.text_field))


def _check_request(*, seq_len: int, samples: int, holdout: int) -> None:
    for flag, value, least in (("--seq-len", seq_len, 1), ("--samples", samples, 1),
                               ("held-out windows", holdout, 0)):
        if value < least:
            raise QuantcalError(f"{flag} must be at least {least}, got {value}")


def _nonempty(label: str, texts: Iterator[str]) -> Iterator[str]:
    found = False
    for text in texts:
        if text and not text.isspace():
            found = True
            yield text
    if not found:
        raise QuantcalError(f"{label} holds no non-empty texts; pass a file with text in it")


# ---------------------------------------------------------------- files


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), "")


def _path_texts(path: Path, field: str) -> Iterator[str]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and _suffix(p))
        if not files:
            raise QuantcalError(f"folder {path} holds no {'/'.join(SUFFIXES)} files; "
                                "pass a file, or a folder that holds some")
        return itertools.chain.from_iterable(_file_texts(p, field) for p in files)
    return _file_texts(path, field)


def _file_texts(path: Path, field: str) -> Iterator[str]:
    suffix = _suffix(path)
    if not suffix:
        raise QuantcalError(f"unsupported file type: {path.name}; use one of "
                            f"{', '.join(SUFFIXES)} (or convert the file to one)")
    if suffix == ".parquet":
        reader = _read_parquet(path, field)
    elif suffix == ".txt":
        reader = _read_txt(path)
    elif suffix in (".jsonl", ".jsonl.gz") or _looks_like_jsonl(path):
        reader = _read_jsonl(path, field)
    else:
        reader = _read_json(path, field)
    return _guarded(path, reader)


def _guarded(path: Path, texts: Iterator[str]) -> Iterator[str]:
    try:
        yield from texts
    except QuantcalError:
        raise
    except (OSError, EOFError, ValueError) as exc:  # bad gzip, bad UTF-8, bad parquet
        hint = "is it a complete gzip file?" if path.name.endswith(".gz") else "is it intact?"
        raise QuantcalError(f"cannot read {path}: {type(exc).__name__}: {exc} ({hint})") from exc


def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_txt(path: Path) -> Iterator[str]:
    with _open_text(path) as f:  # universal newlines: CRLF becomes \n
        text = f.read()
    for doc in re.split(r"\n\s*\n", text):  # documents are separated by blank lines
        yield doc.strip("\n")


def _looks_like_jsonl(path: Path) -> bool:
    """A .json(.gz) file whose first line is a whole JSON value and that goes on
    (C4's shards are JSON lines named .json.gz)."""
    try:
        with _open_text(path) as f:
            json.loads(f.readline())
            return any(line.strip() for line in f)
    except (OSError, EOFError, ValueError):
        return False  # let the full reader report it


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    with _open_text(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise QuantcalError(f"{path}: bad JSON on line {n} ({exc.msg}); fix or "
                                    "remove that line") from exc
            yield _field_text(record, field, f"line {n}", path)


def _read_json(path: Path, field: str) -> Iterator[str]:
    with _open_text(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise QuantcalError(f"{path}: bad JSON at line {exc.lineno} ({exc.msg})") from exc
    if isinstance(data, dict) and field not in data:
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise QuantcalError(
                f"{path} holds an object with keys {', '.join(map(str, data)) or '(none)'} "
                f"and no single list of records; give a list of objects, an object holding "
                "one such list, or JSON lines")
        data = data[lists[0]]
    records = data if isinstance(data, list) else [data]
    for n, record in enumerate(records):
        yield record if isinstance(record, str) else _field_text(record, field, f"record {n}", path)


def _field_text(record, field: str, where: str, path: Path) -> str:
    if not isinstance(record, dict):
        raise QuantcalError(f"{path}: {where} is a {type(record).__name__}, not an object "
                            f"with a '{field}' field")
    if field not in record:
        text_keys = [k for k, v in record.items() if isinstance(v, str)]
        hint = f"pass --text-field {text_keys[0]}" if text_keys else "pass --text-field"
        raise QuantcalError(f"{path}: {where} has no field '{field}'; its fields are "
                            f"{', '.join(map(str, record)) or '(none)'}; {hint}")
    value = record[field]
    if value is not None and not isinstance(value, str):
        raise QuantcalError(f"{path}: field '{field}' of {where} is a {type(value).__name__}, "
                            "not text; pass --text-field naming a text field")
    return value or ""


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if field not in names:
        raise QuantcalError(f"{path} has no column '{field}'; its columns are "
                            f"{', '.join(names)}; pass --text-field with one of them")
    for batch in pf.iter_batches(batch_size=1024, columns=[field]):
        for value in batch.column(0).to_pylist():
            yield _field_text({field: value}, field, "a row", path)
