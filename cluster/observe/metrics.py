"""Per-iteration metrics: one JSON line per iteration, and the table printed to the user."""

from __future__ import annotations

import json
import math
import os
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
SHORT_NAMES = {"correctness": "acc", "repetition": "rep", "instructions": "instr"}


def rl_columns(objectives: list[str], hierarchy: bool, eval_mode: str | None, env: bool = False) -> tuple:
    """The RL table for this run's reward model: reward, each objective, the ALaRM branch rate (share of samples
    whose aspects counted), [multi-turn: the tool-call rate, tool errors and turns per trajectory], length, KL,
    eval accuracy, and the phase times."""
    cols = [("iter", "iteration", "{:>4d}"), ("reward", "reward/mean", "{:>7.3f}")]
    for name in objectives:
        label = SHORT_NAMES.get(name, name)[:7]
        cols.append((label, f"objective/{name}", "{:>" + str(max(6, len(label))) + ".2f}"))
    if hierarchy:
        cols.append(("aspects%", "branch/holistic+aspects", "{:>8.2f}"))
    if env:
        cols += [("calls%", "env/tool_call_rate", "{:>6.2f}"), ("tool err", "env/tool_errors", "{:>8.2f}")]
        cols.append(("turns", "env/turns", "{:>5.2f}"))
    cols += [("len", "response_tokens/mean", "{:>5.0f}"), ("kl", "train/kl", "{:>7.4f}")]
    if eval_mode:
        cols += [
            ("eval acc", f"eval/{eval_mode}/accuracy", "{:>8.2f}"),
            ("eval rwd", f"eval/{eval_mode}/reward/mean", "{:>8.3f}"),
        ]
    cols += [
        ("gen s", "time/generate", "{:>6.1f}"),
        ("score s", "time/score", "{:>7.2f}"),
        ("learn s", "time/learn", "{:>7.1f}"),
        ("sync s", "time/sync", "{:>6.2f}"),
    ]
    return tuple(cols)


# Offline DPO: no generation or scoring; the learner's own pair statistics.
OFFLINE_DPO_COLUMNS = (
    ("step", "iteration", "{:>4d}"),
    ("pairs", "train/pairs", "{:>5.0f}"),
    ("loss", "train/loss", "{:>7.4f}"),
    ("margin", "train/margin", "{:>7.4f}"),
    ("pref acc", "train/accuracy", "{:>8.2f}"),
    ("lr", "train/lr", "{:>9.2e}"),
    ("learn s", "time/learn", "{:>7.1f}"),
)

# Reward-model training on the learner group (Bradley-Terry / HaF): one row per learner call.
RM_COLUMNS = (
    ("step", "iteration", "{:>4d}"),
    ("pairs", "train/pairs", "{:>5.0f}"),
    ("loss", "train/loss", "{:>7.4f}"),
    ("bt loss", "train/reward_loss", "{:>7.4f}"),
    ("pref acc", "train/accuracy", "{:>8.2f}"),
    ("margin", "train/margin", "{:>7.3f}"),
    ("lr", "train/lr", "{:>9.2e}"),
)


class MetricsWriter:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        clean = {k: None if k in nonfinite_keys(record) else v for k, v in record.items()}
        self._file.write(json.dumps(clean, sort_keys=True, default=str) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())  # a row on disk is an iteration a resume will not redo

    def write_many(self, records: list[dict]) -> None:
        """Several rows, one fsync."""
        for record in records:
            self._file.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def rewind(self, iteration: int) -> list[dict]:
        """Keep the rows up to `iteration` (a rollback or resume redoes the later ones); returns the rows removed.
        A torn last line (the writer was killed mid-write) is removed too."""
        self._file.close()
        kept, removed = [], []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            (kept if row.get("iteration", -1) <= iteration else removed).append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        return [json.loads(x) for x in removed]

    def close(self) -> None:
        self._file.close()


def nonfinite_keys(record: dict) -> list[str]:
    """Keys of a row's inf/NaN numbers: JSON has no such values, so they are written as null (and counted,
    `with_nonfinite_count`)."""
    return [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]


def with_nonfinite_count(record: dict) -> dict:
    """`record` plus metrics/nonfinite: how many of its values are inf/NaN (a value not measured, such as
    train/kl without a reference model, or one that went wrong)."""
    return {**record, "metrics/nonfinite": len(nonfinite_keys(record))}


def table_header(columns=TABLE_COLUMNS) -> str:
    widths = [len(fmt.format(0)) if "d" in fmt else len(fmt.format(0.0)) for _, _, fmt in columns]
    return " ".join(name.rjust(w) for (name, _, _), w in zip(columns, widths, strict=True))


def table_row(record: dict, columns=TABLE_COLUMNS) -> str:
    cells = []
    for _name, key, fmt in columns:
        value = record.get(key)
        width = len(fmt.format(0)) if "d" in fmt else len(fmt.format(0.0))
        if key == "iteration" and isinstance(value, int) and value < 0:
            cells.append("init".rjust(width))  # the evaluation before training
            continue
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        cells.append("-".rjust(width) if missing else fmt.format(value))
    return " ".join(cells)
