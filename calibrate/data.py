"""Calibration text: where it comes from and how it becomes token windows.

Owns the ``--data`` vocabulary (``c4``, ``wikitext2`` or a path). Reads text lazily from a
local folder laid out like ``shared/data`` (``data_dir`` or ``$QUANTCAL_DATA_DIR``), else from
the Hugging Face hub through ``datasets`` (or its cache), or from a user's .txt, .json,
.jsonl, .jsonl.gz, .json.gz or .parquet file (or a folder of them); tokenizes it into one
stream and picks non-overlapping windows from it by seed. Writes nothing. Every error a
user can cause is a :class:`QuantcalError` whose message says what to do.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import closing
from pathlib import Path

import torch

from quantcal.datadir import DATA_DIR_ENV, find_local, hub_access
from quantcal.errors import QuantcalError

NAMED = ("c4", "wikitext2")
SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet", ".txt")
LOCAL_FILES = {  # under a local data folder, in order of preference
    "c4": ("c4/c4_validation_2k.jsonl.gz", "c4/c4_validation_2k.parquet"),
    "wikitext2": ("wikitext2/wiki.test.raw",),
}
HUB_ARGS = {  # wikitext2 calibrates on the hub's train split; shared/data holds only test
    "c4": dict(path="allenai/c4", split="validation",
               data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}),
    "wikitext2": dict(path="wikitext", name="wikitext-2-raw-v1", split="train"),
}
TOKENS_MARGIN = 2.0


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
    if spec.lower() in NAMED:
        label, texts = _named_source(spec.lower(), data_dir)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            if "/" in spec or os.sep in spec or path.suffix:
                raise QuantcalError(f"data file not found: {spec}; check the path")
            raise QuantcalError(f"unknown data set '{spec}' and no such file: choose one of "
                                f"{', '.join(NAMED)} or a path to a {'/'.join(SUFFIXES)} file")
        label, texts = str(path), _path_texts(path, text_field)
    return _nonempty(label, texts)


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
    if tokenizer.eos_token_id is None:
        raise QuantcalError("the tokenizer has no eos token to separate documents with; "
                            "set tokenizer.eos_token or use the model's own tokenizer")
    sep = torch.tensor([tokenizer.eos_token_id], dtype=torch.long)
    pieces: list[torch.Tensor] = []
    total, it = 0, iter(texts)
    while batch := list(itertools.islice(it, batch_size)):
        encoded = tokenizer(batch, add_special_tokens=False, return_attention_mask=False,
                            verbose=False)
        for ids in filter(None, encoded["input_ids"]):  # skip documents with no tokens
            if pieces:
                pieces.append(sep)
                total += 1
            pieces.append(torch.tensor(ids, dtype=torch.long))
            total += len(ids)
            if max_tokens is not None and total >= max_tokens:
                return torch.cat(pieces)
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)


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
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return windows[order[:samples]], windows[order[samples:samples + holdout]]


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
    """Read ``spec`` and return its calibration and held-out windows.

    Named data sets are read only up to :func:`tokens_to_read` tokens; files are read whole.
    Args and Returns: as :func:`iter_texts` and :func:`calibration_windows`.
    """
    _check_request(seq_len=seq_len, samples=samples, holdout=holdout)
    budget = tokens_to_read(seq_len=seq_len, samples=samples, holdout=holdout)
    budget = budget if spec.lower() in NAMED else None
    with closing(iter_texts(spec, text_field=text_field, data_dir=data_dir)) as texts:
        stream = token_stream(texts, tokenizer, max_tokens=budget)
    return pick_windows(stream, seq_len=seq_len, samples=samples, seed=seed,
                        holdout=holdout, source=spec)


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


# ---------------------------------------------------------------- named data sets


def _named_source(name: str, data_dir: Path | None) -> tuple[str, Iterator[str]]:
    path, missing = find_local(LOCAL_FILES[name], data_dir, "data folder")
    if path is None:
        return name, _hub_texts(name, missing)
    texts = _wiki_raw(path) if name == "wikitext2" else _path_texts(path, "text")
    return f"{name} ({path})", texts


def _wiki_raw(path: Path) -> Iterator[str]:
    # The whole file is one document, as the usual "\n\n".join(rows) recipe makes it.
    yield path.read_bytes().decode("utf-8").replace("\r\n", "\n")


def _hub_texts(name: str, missing: str) -> Iterator[str]:
    import datasets

    def fail(why: str) -> QuantcalError:
        layout = ", ".join(LOCAL_FILES[name])
        return QuantcalError(
            f"could not load {name} from the Hugging Face hub ({why}); {missing}pass "
            f"--data PATH with a local text file, or set {DATA_DIR_ENV} to a folder laid out "
            f"like shared/data ({layout})")

    offline, unusable = hub_access()
    if unusable:
        raise fail(unusable)
    streaming = name == "c4" and not offline  # streams cannot come from the cache
    try:
        rows = datasets.load_dataset(**HUB_ARGS[name], streaming=streaming)
    except Exception as exc:  # offline, not cached, network, auth: all mean the same here
        raise fail(f"{type(exc).__name__}: {exc}") from exc
    if name == "wikitext2":
        return iter(["\n\n".join(rows["text"])])
    return _hub_rows(rows, fail)


def _hub_rows(rows, fail) -> Iterator[str]:  # a stream can break half way
    try:
        for row in rows:
            yield row["text"]
    except (OSError, ValueError) as exc:
        raise fail(f"{type(exc).__name__}: {exc}") from exc


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
