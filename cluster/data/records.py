"""The one reader of data rows (prompts, preference pairs, ratings, the public-data converters), each row with
where it came from ("file:line", "file:row N" or "dataset[index]").

Sources: a JSONL (optionally .gz) file, a JSON file holding a list of rows, a parquet file, a folder written by
`datasets.Dataset.save_to_disk`, a folder of data files `datasets.load_dataset` understands, or a Hugging Face hub
id (only when online; HF_HUB_OFFLINE=1 makes that a clear error).

A row problem is a counted skip; a file problem is an error naming the file. A JSONL line that is not UTF-8, not
JSON, not a JSON object or longer than MAX_LINE_BYTES comes back as a `BadRow`, so the caller counts it and the
run goes on. A UTF-8 byte-order mark is stripped. A malformed .json file, a .json file that is not a list, an
unreadable parquet file and a truncated or corrupt .gz file raise naming the file (and the JSON error's line and
column, or the last line read): how much of such a file is lost is unknown, so no count could say it honestly,
and a run on part of a dataset would differ silently from the run that was asked for.

Loaders raise `SkipRow(reason, detail)` for a row they cannot use and count it in a `Skipped` counter, which
logs the first few of each reason with where they are.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("troupe.data")
BOM = b"\xef\xbb\xbf"
MAX_LINE_BYTES = 16 * 2**20  # a longer JSONL line is skipped and counted, never held in memory whole
LOGGED_PER_REASON = 5  # the first skipped rows of each reason are logged with where they are; all are counted
GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


class SkipRow(ValueError):
    """A row a loader cannot use: counted by `reason`, the run goes on. The message names the field."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class BadRow:
    """A row the reader could not turn into an object; `reason` is the count's key, `detail` says why."""

    where: str
    reason: str
    detail: str


class Skipped(Counter):
    """Rows skipped, by reason, with where the first of each reason was; the first few of each are logged."""

    def __init__(self, *args, **kwargs) -> None:  # Counter's copy and pickle call cls(mapping)
        super().__init__(*args, **kwargs)
        self.first: dict[str, str] = {}

    def add(self, reason: str, where: str, detail: str = "") -> None:
        self[reason] += 1
        said = f"{where}: {detail}" if detail else where
        self.first.setdefault(reason, said)
        if self[reason] <= LOGGED_PER_REASON:
            log.warning("skipped %s", said)

    def report(self) -> dict:
        return {k: f"{n} (first: {self.first[k]})" if k in self.first else n for k, n in self.items()}


def iter_rows(source: str, split: str = "train") -> Iterator[tuple[str, dict | BadRow]]:
    path = Path(source).expanduser()
    if path.is_dir():
        yield from _dataset_rows(_load_folder(path, split), str(path))
        return
    if path.exists():
        yield from file_rows(path)
        return
    if _looks_local(source):
        raise FileNotFoundError(f"prompt dataset not found: {source}")
    yield from _dataset_rows(_load_hub(source, split), source)


def content_sha256(source: str) -> str | None:
    """sha256 of a source's bytes, streamed: a file, or every file of a folder (with its relative path). None for a
    hub id, which has no local bytes. Checkpoints record it, so a resume refuses a replaced file."""
    path = Path(source).expanduser()
    if not path.exists():
        if _looks_local(source):
            raise FileNotFoundError(f"prompt dataset not found: {source}")
        return None
    path = path.absolute()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _hash_files(str(path), path.is_dir(), stats)


@functools.lru_cache(maxsize=8)
def _hash_files(root: str, is_dir: bool, stats: tuple) -> str:
    """Keyed by each file's size and mtime: a launch hashes its data once (fingerprint, then cursor), and a
    file changed in between is hashed again."""
    h = hashlib.sha256()
    for file, size, _ in stats:
        if is_dir:  # name and size first: the same bytes split across other files differ
            h.update(f"{Path(file).relative_to(root)}\0{size}\0".encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).suffix in (".jsonl", ".json", ".parquet", ".gz")


def file_rows(path: str | Path, what: str = "data file") -> Iterator[tuple[str, dict | BadRow]]:
    """The rows of a .jsonl[.gz], .json[.gz] or .parquet file; `what` names the file in a not-found error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    name = path.name.removesuffix(".gz")
    if name.endswith(".parquet"):
        import pandas as pd

        try:
            rows = pd.read_parquet(path).to_dict("records")
        except (
            Exception
        ) as e:  # pyarrow's errors have many types; each is "this file is not readable parquet"
            raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from e
        for i, row in enumerate(rows, start=1):
            yield f"{path}:row {i}", _plain(row)
    elif name.endswith(".json"):
        data = json_document(path)
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json data file must hold a list of rows, got {type(data).__name__}")
        for i, row in enumerate(data, start=1):
            where = f"{path}:row {i}"
            yield where, row if isinstance(row, dict) else _not_an_object(where, row)
    elif name.endswith(".jsonl"):
        for line_no, row in jsonl_rows(path):
            yield f"{path}:{line_no}", row
    else:
        raise ValueError(f"{path}: data files are .jsonl, .jsonl.gz, .json, .json.gz or .parquet")


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict | BadRow]]:
    """(line number, object or BadRow) for each non-blank line, decoded one line at a time so a bad byte costs
    only its line."""
    for line_no, raw in _lines(path):
        where = f"{path}:{line_no}"
        if raw is None:
            yield line_no, BadRow(where, "line_too_long", f"longer than {MAX_LINE_BYTES} bytes")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield line_no, BadRow(where, "invalid_utf8", f"not UTF-8 at byte {e.start + 1} of the line")
            continue
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            yield line_no, BadRow(where, "malformed_json", f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        yield line_no, row if isinstance(row, dict) else _not_an_object(where, row)


def json_document(path: Path):
    """A whole .json[.gz] file parsed; a bad byte or malformed JSON raises naming the file and the position."""
    raw = _read_all(path)
    try:
        text = raw.removeprefix(BOM).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 at byte {e.start + 1}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None


def _read_all(path: Path) -> bytes:
    if not path.name.endswith(".gz"):
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except GZIP_ERRORS as e:
        raise ValueError(f"{path}: truncated or corrupt gzip file ({e})") from None


def _lines(path: Path) -> Iterator[tuple[int, bytes | None]]:
    """Numbered raw lines, the BOM stripped; None for a line over MAX_LINE_BYTES (read to its end, not kept)."""
    line_no = 0
    try:
        with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as f:
            while line := f.readline(MAX_LINE_BYTES + 1):
                line_no += 1
                if line_no == 1:
                    line = line.removeprefix(BOM)
                if len(line) > MAX_LINE_BYTES:
                    while line and not line.endswith(b"\n"):  # the rest of that line
                        line = f.readline(MAX_LINE_BYTES + 1)
                    yield line_no, None
                else:
                    yield line_no, line
    except GZIP_ERRORS as e:
        raise ValueError(
            f"{path}: truncated or corrupt gzip file after line {line_no} ({e}); the rest of the file is "
            "unreadable, so it is refused rather than used in part: re-create or re-download it"
        ) from None


def _not_an_object(where: str, row) -> BadRow:
    return BadRow(where, "not_an_object", f"a row must be a JSON object, got {type(row).__name__}")


def _load_folder(path: Path, split: str):
    import datasets

    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        loaded = datasets.load_from_disk(str(path))
    else:
        loaded = datasets.load_dataset(str(path))
    return _pick_split(loaded, split, str(path))


def _load_hub(source: str, split: str):
    """A hub id, with its configuration after a colon where the dataset has several ("openai/gsm8k:main")."""
    import datasets

    name, _, subset = source.partition(":")
    try:
        return datasets.load_dataset(name, subset or None, split=split)
    except Exception as e:  # offline, unknown id, no such split: say which source and why
        raise FileNotFoundError(
            f"prompt dataset {source!r} is neither a local file or folder nor a loadable hub dataset: {e}"
        ) from e


def _pick_split(loaded, split: str, where: str):
    if hasattr(loaded, "keys"):  # a DatasetDict
        if split not in loaded:
            raise KeyError(f"{where}: no split {split!r}; it has {sorted(loaded.keys())}")
        return loaded[split]
    return loaded


def _dataset_rows(dataset, where: str) -> Iterator[tuple[str, dict | BadRow]]:
    for i, row in enumerate(dataset):
        yield f"{where}[{i}]", _plain(row)


def _plain(value):
    """numpy arrays and scalars (parquet list columns) -> Python lists and numbers, so rows look the same from
    every source."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _plain(value.tolist())
    if isinstance(value, float) and value != value:  # pandas reads a null in a numeric column as NaN
        return None
    if type(value).__name__ in ("NAType", "NaTType"):  # pd.NA / pd.NaT: a null, not a value
        return None
    return value
