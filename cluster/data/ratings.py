"""Absolute multi-objective ratings (ArmoRM stage 1) from JSONL/JSON/parquet: one response per record, with a
rating per objective on a configured scale. Ratings are rescaled to [0, 1]; a missing rating is NaN and ignored
for that objective only; a rating outside its scale fails naming the file, line and objective. A record with an
empty response or no rating for any objective is skipped and counted (`Ratings.skipped`).

Scales come from `rm.scales` ({objective: [lo, hi]}) and/or `rm.scales_path` (a YAML or JSON file holding the
same mapping); an objective in both takes the command line's scale.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from troupe.actors.reward.armo import rescale
from troupe.cluster.data.preferences import read_records


@dataclass(frozen=True)
class Ratings:
    prompts: list[list[dict]]
    responses: list[str]
    labels: torch.Tensor  # [N, K] in [0, 1], NaN where missing
    objectives: list[str]
    sources: list[str]
    skipped: Counter = field(default_factory=Counter)  # {reason: records}


def parse_scales(value, where: str) -> dict[str, tuple[float, float]]:
    """{objective: (lo, hi)} from a mapping of two-number lists; errors name `where` (a key or a file)."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must map each objective to [lo, hi], got {value!r}")
    out = {}
    for obj, scale in value.items():
        ok = isinstance(scale, Sequence) and not isinstance(scale, str) and len(scale) == 2
        try:
            lo, hi = (float(scale[0]), float(scale[1])) if ok else (0.0, 0.0)
        except (TypeError, ValueError):
            ok = False
        if not ok or not lo < hi:
            raise ValueError(f"{where}.{obj} must be [lo, hi] with lo < hi, got {scale!r}")
        out[str(obj)] = (lo, hi)
    return out


def resolve_scales(inline, path: str | None) -> dict[str, tuple[float, float]]:
    """rm.scales_path's mapping, then rm.scales on top."""
    scales = {}
    if path:
        import yaml

        file = Path(path)
        if not file.exists():
            raise FileNotFoundError(f"rm.scales_path: no such file {path}")
        scales |= parse_scales(yaml.safe_load(file.read_text()), str(file))
    if inline:
        scales |= parse_scales(inline, "rm.scales")
    if not scales:
        raise ValueError("no rating scales: set rm.scales={objective: [lo, hi]} or rm.scales_path=<yaml>")
    return scales


def load_ratings(
    path: str,
    scales: Mapping[str, Sequence[float]],
    prompt_key: str = "prompt",
    response_key: str = "response",
) -> Ratings:
    records = read_records(path)
    prompts, responses, raw, sources = [], [], {k: [] for k in scales}, []
    skipped: Counter = Counter()
    for line_no, rec in records:
        where = f"{path}:{line_no}"
        for key in (prompt_key, response_key):
            if key not in rec:
                raise ValueError(f"{where}: missing key {key!r} (has {sorted(rec)})")
        values = {obj: rec.get(obj) for obj in scales}
        response = str(rec[response_key])
        if not response.strip():
            skipped["empty_response"] += 1
            continue
        if all(v is None or v != v for v in values.values()):  # None or NaN (parquet's missing)
            skipped["no_rating"] += 1  # nothing to fit on; would only cost a forward pass
            continue
        prompt = rec[prompt_key]
        prompts.append([{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt))
        responses.append(response)
        sources.append(where)
        for obj, value in values.items():
            raw[obj].append(None if value is None else float(value))
    columns = []
    for obj, (lo, hi) in scales.items():
        if all(v is None for v in raw[obj]):
            raise ValueError(f"{path}: objective {obj!r} has no ratings in any record")
        columns.append(rescale(raw[obj], lo, hi, obj, sources))
    return Ratings(prompts, responses, torch.stack(columns, dim=1), list(scales), sources, skipped)
