"""Reads preference files (JSONL, JSONL.gz, JSON array, parquet) into tokenised `PreferencePair`s.

Accepted record shapes (keys configurable):
  plain:  {"prompt": str, "chosen": str, "rejected": str}
  chat:   {"chosen": [messages...], "rejected": [messages...]} (the prompt is all but the last message;
          an explicit "prompt" (str or messages) wins)
  hh-rlhf transcripts: {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}
A record missing a key fails naming the file and line; an empty response, identical responses, chat pairs whose
conversations differ before the compared turn, and records past `max_pairs` are skipped and counted by reason, so
kept + skipped is every record of the file. Subsampling (`max_pairs`, `max_pairs_per_subset`): sample="first"
keeps the first pairs in file order, "random" a seeded random choice (kept in file order); the per-subset cap
applies first (counted as over_max_pairs_per_subset), then max_pairs (over_max_pairs).
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from troupe.actors.learner.dpo import PreferencePair

_TURN = re.compile(r"\n\n(Human|Assistant): ")


@dataclass(frozen=True)
class Preference:
    prompt: list[dict]  # chat messages up to (not including) the compared assistant turn
    chosen: str
    rejected: str
    source: str  # "file:line"
    subset: str = ""  # for per-subset evaluation (RewardBench-style)


class SkipRecord(ValueError):
    """A record that is well-formed but unusable; loaders count it by `reason` instead of failing."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.reason = reason


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"preference file not found: {path}")
    name = path.name
    if name.endswith(".parquet"):
        import pandas as pd

        return list(enumerate(pd.read_parquet(path).to_dict("records"), start=1))
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        if name.removesuffix(".gz").endswith(".json"):
            data = json.load(f)
            if not isinstance(data, list):
                raise ValueError(f"{path}: a .json preference file must hold a list of records")
            return list(enumerate(data, start=1))
        out = []
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                try:
                    out.append((line_no, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
        return out


def parse_transcript(text: str) -> list[dict]:
    """hh-rlhf "\\n\\nHuman: ...\\n\\nAssistant: ..." into chat messages."""
    parts = _TURN.split(text)
    if len(parts) < 3:
        raise ValueError("no 'Human:'/'Assistant:' turns")
    return [
        {"role": "user" if who == "Human" else "assistant", "content": content.strip()}
        for who, content in zip(parts[1::2], parts[2::2], strict=True)
    ]


def to_preference(
    record: dict, where: str, prompt_key: str, chosen_key: str, rejected_key: str
) -> Preference:
    for key in (chosen_key, rejected_key):
        if key not in record:
            raise ValueError(f"{where}: missing key {key!r} (has {sorted(record)})")
    chosen, rejected = record[chosen_key], record[rejected_key]
    if isinstance(chosen, str) and chosen.startswith("\n\nHuman:"):
        chosen, rejected = parse_transcript(chosen), parse_transcript(rejected)
    if isinstance(chosen, str):
        if prompt_key not in record:
            raise ValueError(f"{where}: missing key {prompt_key!r} (plain-text pairs need a prompt)")
        prompt = record[prompt_key]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return Preference(prompt, chosen, str(rejected), where)
    chosen, rejected = list(chosen), list(rejected)
    if not chosen or not rejected or chosen[-1].get("role") != "assistant":
        raise ValueError(f"{where}: chat pairs must end with an assistant message")
    prompt = record.get(prompt_key)
    if prompt is None:
        prompt = chosen[:-1]
        if rejected[:-1] != prompt:
            raise SkipRecord(
                where, "conversations_differ"
            )  # 5 of hh-rlhf harmless-base test: broken turn marks
    elif isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    return Preference(list(prompt), chosen[-1]["content"], rejected[-1]["content"], where)


def load_preferences(
    path: str | Path,
    prompt_key: str = "prompt",
    chosen_key: str = "chosen",
    rejected_key: str = "rejected",
    max_pairs: int | None = None,
    subset_key: str | None = None,
    sample: str = "first",
    seed: int = 0,
    max_pairs_per_subset: int | None = None,
) -> tuple[list[Preference], Counter]:
    if sample not in ("first", "random"):
        raise ValueError(f"sample must be 'first' or 'random', got {sample!r}")
    if max_pairs_per_subset is not None and subset_key is None:
        raise ValueError("max_pairs_per_subset needs subset_key (the field naming each record's subset)")
    if sample == "first" and max_pairs_per_subset is None:
        return _load(path, prompt_key, chosen_key, rejected_key, max_pairs, subset_key)
    prefs, skipped = _load(path, prompt_key, chosen_key, rejected_key, None, subset_key)
    rng = random.Random(seed)

    def choose(indices: list[int], n: int) -> list[int]:
        return indices[:n] if sample == "first" else sorted(rng.sample(indices, n))

    keep = list(range(len(prefs)))
    if max_pairs_per_subset is not None:
        by_subset: dict[str, list[int]] = {}
        for i in keep:
            by_subset.setdefault(prefs[i].subset, []).append(i)
        keep = sorted(
            i for idx in by_subset.values() for i in choose(idx, min(max_pairs_per_subset, len(idx)))
        )
        if len(prefs) > len(keep):
            skipped["over_max_pairs_per_subset"] += len(prefs) - len(keep)
    if max_pairs is not None and len(keep) > max_pairs:
        skipped["over_max_pairs"] += len(keep) - max_pairs
        keep = choose(keep, max_pairs)
    return [prefs[i] for i in keep], skipped


def _load(
    path, prompt_key, chosen_key, rejected_key, max_pairs, subset_key
) -> tuple[list[Preference], Counter]:
    skipped: Counter = Counter()
    out = []
    for line_no, record in read_records(path):
        if max_pairs is not None and len(out) >= max_pairs:
            skipped["over_max_pairs"] += 1  # read but not used: counted, so the report adds up to the file
            continue
        try:
            pref = to_preference(record, f"{path}:{line_no}", prompt_key, chosen_key, rejected_key)
        except SkipRecord as skip:
            skipped[skip.reason] += 1
            continue
        if not pref.chosen.strip() or not pref.rejected.strip():
            skipped["empty_response"] += 1
            continue
        if pref.chosen == pref.rejected:
            skipped["identical_responses"] += 1
            continue
        if subset_key is not None:
            pref = replace(pref, subset=str(record.get(subset_key, "")))
        out.append(pref)
    return out, skipped


def tokenize(prefs: list[Preference], tokenizer, max_length: int) -> tuple[list[PreferencePair], Counter]:
    """Chat-template the prompt; responses end with EOS. Pairs longer than max_length are skipped, counted."""
    skipped: Counter = Counter()
    pairs = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for p in prefs:
        prompt_ids = tokenizer.apply_chat_template(p.prompt, add_generation_prompt=True, tokenize=True)
        if not isinstance(prompt_ids, list):
            prompt_ids = prompt_ids["input_ids"]
        chosen = tokenizer(p.chosen, add_special_tokens=False)["input_ids"] + eos
        rejected = tokenizer(p.rejected, add_special_tokens=False)["input_ids"] + eos
        if len(prompt_ids) + max(len(chosen), len(rejected)) > max_length:
            skipped["too_long"] += 1
            continue
        pairs.append(PreferencePair(tuple(prompt_ids), tuple(chosen), tuple(rejected)))
    return pairs, skipped
