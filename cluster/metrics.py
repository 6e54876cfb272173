"""Per-iteration metrics: one JSON line per iteration, and the table printed to the user."""

from __future__ import annotations

import json
import math
from pathlib import Path

TABLE_COLUMNS = (
    ("iter", "iteration", "{:>4d}"),
    ("reward", "reward/mean", "{:>7.3f}"),
    ("acc", "objective/correctness", "{:>5.2f}"),
    ("format", "objective/format", "{:>6.2f}"),
    ("len", "response_tokens/mean", "{:>5.0f}"),
    ("kl", "train/kl", "{:>7.4f}"),
    ("gen s", "time/generate", "{:>6.1f}"),
    ("score s", "time/score", "{:>7.2f}"),
    ("learn s", "time/learn", "{:>7.1f}"),
    ("sync s", "time/sync", "{:>6.2f}"),
)


class MetricsWriter:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        clean = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}
        self._file.write(json.dumps(clean, sort_keys=True, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def table_header() -> str:
    widths = [len(fmt.format(0)) if "d" in fmt else len(fmt.format(0.0)) for _, _, fmt in TABLE_COLUMNS]
    return " ".join(name.rjust(w) for (name, _, _), w in zip(TABLE_COLUMNS, widths, strict=True))


def table_row(record: dict) -> str:
    cells = []
    for _name, key, fmt in TABLE_COLUMNS:
        value = record.get(key)
        width = len(fmt.format(0)) if "d" in fmt else len(fmt.format(0.0))
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        cells.append("-".rjust(width) if missing else fmt.format(value))
    return " ".join(cells)
