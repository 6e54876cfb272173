"""Reads the rows of a prompt dataset, each with where it came from ("file:line" or "dataset[index]").

Sources: a JSONL (optionally .gz) file, a JSON file holding a list of rows, a parquet file, a folder written by
`datasets.Dataset.save_to_disk`, a folder of data files `datasets.load_dataset` understands, or a Hugging Face hub
id (only when online; HF_HUB_OFFLINE=1 makes that a clear error). A malformed JSONL line is not raised: it comes
back as a `BadRow` so the caller can skip and count it and the run goes on.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BadRow:
    where: str
    reason: str


def iter_rows(source: str, split: str = "train") -> Iterator[tuple[str, dict | BadRow]]:
    path = Path(source).expanduser()
    if path.is_dir():
        yield from _dataset_rows(_load_folder(path, split), str(path))
        return
    if path.exists():
        yield from _file_rows(path)
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
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for file in files:
        if path.is_dir():  # name and size first: the same bytes split across other files differ
            h.update(f"{file.relative_to(path)}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).suffix in (".jsonl", ".json", ".parquet", ".gz")


def _file_rows(path: Path) -> Iterator[tuple[str, dict | BadRow]]:
    name = path.name.removesuffix(".gz")
    if name.endswith(".parquet"):
        import pandas as pd

        for i, row in enumerate(pd.read_parquet(path).to_dict("records")):
            yield f"{path}:row {i + 1}", _plain(row)
        return
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        if name.endswith(".json"):
            data = json.load(f)
            if not isinstance(data, list):
                raise ValueError(f"{path}: a .json prompt file must hold a list of rows")
            for i, row in enumerate(data):
                yield f"{path}:row {i + 1}", row
            return
        if not name.endswith(".jsonl"):
            raise ValueError(f"{path}: prompt files are .jsonl, .jsonl.gz, .json or .parquet")
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{line_no}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{line_no}", BadRow(f"{path}:{line_no}", f"malformed JSON ({e.msg})")


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
