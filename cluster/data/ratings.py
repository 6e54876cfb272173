"""Absolute multi-objective ratings (ArmoRM stage 1) from JSONL/JSON/parquet: one response per record, with a
rating per objective on a configured scale. Ratings are rescaled to [0, 1]; a missing rating is NaN and ignored
for that objective only; a rating outside its scale fails naming the file, line and objective."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from actors.reward.armo import rescale
from cluster.data.preferences import read_records


@dataclass(frozen=True)
class Ratings:
    prompts: list[list[dict]]
    responses: list[str]
    labels: torch.Tensor  # [N, K] in [0, 1], NaN where missing
    objectives: list[str]
    sources: list[str]


def load_ratings(
    path: str,
    scales: Mapping[str, Sequence[float]],
    prompt_key: str = "prompt",
    response_key: str = "response",
) -> Ratings:
    records = read_records(path)
    prompts, responses, raw, sources = [], [], {k: [] for k in scales}, []
    for line_no, rec in records:
        where = f"{path}:{line_no}"
        for key in (prompt_key, response_key):
            if key not in rec:
                raise ValueError(f"{where}: missing key {key!r} (has {sorted(rec)})")
        prompt = rec[prompt_key]
        prompts.append([{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt))
        responses.append(str(rec[response_key]))
        sources.append(where)
        for obj in scales:
            value = rec.get(obj)
            raw[obj].append(None if value is None else float(value))
    columns = []
    for obj, (lo, hi) in scales.items():
        if all(v is None for v in raw[obj]):
            raise ValueError(f"{path}: objective {obj!r} has no ratings in any record")
        columns.append(rescale(raw[obj], lo, hi, obj, sources))
    return Ratings(prompts, responses, torch.stack(columns, dim=1), list(scales), sources)
