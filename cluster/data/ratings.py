"""Absolute multi-objective ratings (ArmoRM stage 1) from JSONL/JSON/parquet (rows by `records.file_rows`): one
response per record, with a rating per objective on a configured scale. Ratings are rescaled to [0, 1]; an absent
or null rating is NaN and ignored for that objective only (a multi-source file rates each row on its source's
objectives). Every other problem skips the record, counted by reason in `Ratings.skipped` and logged with
file:line and the field: a missing or null prompt or response, a response that is not text, an empty response, a
rating that is not a number ("N/A", true, a list, NaN), a rating outside its scale, no rating at all.

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
from troupe.cluster.data import fields
from troupe.cluster.data.records import BadRow, Skipped, SkipRow, file_rows


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
    prompts, responses, raw, sources = [], [], {k: [] for k in scales}, []
    skipped = Skipped()
    for where, rec in file_rows(path, "ratings file"):
        try:
            if isinstance(rec, BadRow):
                raise SkipRow(rec.reason, rec.detail)
            prompt = fields.prompt(fields.required(rec, prompt_key), repr(prompt_key))
            response = fields.text(fields.required(rec, response_key), repr(response_key), "bad_response")
            if not response.strip():
                raise SkipRow("empty_response", f"{response_key!r} is empty")
            values = {obj: _rating(rec.get(obj), obj, scales[obj]) for obj in scales}
            if all(v is None for v in values.values()):  # nothing to fit on; would only cost a forward pass
                raise SkipRow("no_rating", f"no rating for any of {', '.join(scales)}")
        except SkipRow as e:
            skipped.add(e.reason, where, str(e))
            continue
        prompts.append(prompt)
        responses.append(response)
        sources.append(where)
        for obj, value in values.items():
            raw[obj].append(value)
    if not responses:
        raise ValueError(f"{path}: no usable rated responses (skipped: {skipped.report()})")
    columns = []
    for obj, (lo, hi) in scales.items():
        if all(v is None for v in raw[obj]):
            raise ValueError(f"{path}: objective {obj!r} has no ratings in any record")
        columns.append(rescale(raw[obj], lo, hi, obj, sources))
    return Ratings(prompts, responses, torch.stack(columns, dim=1), list(scales), sources, skipped)


def _rating(value, objective: str, scale: Sequence[float]) -> float | None:
    """A rating on its scale; None when absent or null. A numeric string ("3") counts as its number."""
    if value is None:
        return None
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise SkipRow("bad_rating", f"rating {objective!r} is {value!r}, not a number") from None
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise SkipRow("bad_rating", f"rating {objective!r} holds {type(value).__name__}, not a number")
    if number != number:  # NaN, from a JSON NaN or a "nan" string: not a rating
        raise SkipRow("bad_rating", f"rating {objective!r} is NaN")
    lo, hi = scale
    if not lo <= number <= hi:  # infinities too
        raise SkipRow("out_of_scale", f"rating {objective!r} {value!r} is outside its scale [{lo:g}, {hi:g}]")
    return float(number)
