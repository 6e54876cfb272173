"""Reads preference files (JSONL, JSONL.gz, JSON array, parquet; rows by `records.file_rows`) into tokenised
`PreferencePair`s.

Accepted record shapes (keys configurable):
  plain:  {"prompt": str or messages, "chosen": str, "rejected": str}
  chat:   {"chosen": [messages...], "rejected": [messages...]} (the prompt is all but the last message, which must
          be the assistant's; an explicit "prompt" (str or messages) wins)
  hh-rlhf transcripts: {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}
Every record is kept or skipped and counted by reason, so kept + skipped is every record of the file; the first
few of each reason are logged with file:line and the field: a missing or null key, a response that is not a string
or a message list (or sides of different shapes), messages that are not {role, content} with a known role, a side
that does not end with the assistant's turn, chat pairs whose conversations differ before the compared turn, an
empty prompt or response, identical responses, a line that is not a JSON object, and records past `max_pairs`.
Subsampling (`max_pairs`, `max_pairs_per_subset`): sample="first" keeps the first pairs in file order, "random" a
seeded random choice (kept in file order); the per-subset cap applies first (counted as
over_max_pairs_per_subset), then max_pairs (over_max_pairs).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from troupe.actors.learner.dpo import PreferencePair
from troupe.cluster.data import fields
from troupe.cluster.data.records import BadRow, Skipped, SkipRow, file_rows

_TURN = re.compile(r"\n\n(Human|Assistant): ")


@dataclass(frozen=True)
class Preference:
    prompt: list[dict]  # chat messages up to (not including) the compared assistant turn
    chosen: str
    rejected: str
    source: str  # "file:line"
    subset: str = ""  # for per-subset evaluation (RewardBench-style)


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
    """The pair a record holds, else SkipRow naming the field."""
    chosen, rejected = _side(record, chosen_key), _side(record, rejected_key)
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise SkipRow(
            "bad_response",
            f"{chosen_key!r} and {rejected_key!r} differ in shape (one text, one message list)",
        )
    if isinstance(chosen, str) and chosen.startswith("\n\nHuman:"):
        chosen, rejected = _transcript(chosen, chosen_key), _transcript(rejected, rejected_key)
    if isinstance(chosen, str):
        prompt = fields.prompt(fields.required(record, prompt_key), repr(prompt_key))
    else:
        for key, side in ((chosen_key, chosen), (rejected_key, rejected)):
            if side[-1]["role"] != "assistant":
                raise SkipRow(
                    "not_assistant_turn", f"{key!r} ends with a {side[-1]['role']} turn, not the assistant's"
                )
        if record.get(prompt_key) is None:
            prompt = chosen[:-1]
            if rejected[:-1] != prompt:  # 5 of hh-rlhf harmless-base test: broken turn marks
                raise SkipRow(
                    "conversations_differ", f"{chosen_key!r} and {rejected_key!r} differ before the last turn"
                )
            fields.require_user_turn(prompt, f"{chosen_key!r} before its last turn")
        else:
            prompt = fields.prompt(record[prompt_key], repr(prompt_key))
        chosen, rejected = chosen[-1]["content"], rejected[-1]["content"]
    if not chosen.strip() or not rejected.strip():
        raise SkipRow("empty_response", f"{chosen_key if not chosen.strip() else rejected_key!r} is empty")
    if chosen == rejected:
        raise SkipRow("identical_responses", f"{chosen_key!r} and {rejected_key!r} are the same text")
    return Preference(prompt, chosen, rejected, where)


def _side(record: dict, key: str) -> str | list[dict]:
    value = fields.required(record, key)
    return value if isinstance(value, str) else fields.messages(value, repr(key), "bad_response")


def _transcript(text: str, key: str) -> list[dict]:
    try:
        return parse_transcript(text)
    except ValueError as e:
        raise SkipRow("bad_response", f"{key!r} is an hh-rlhf transcript on one side only ({e})") from None


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
    skipped = Skipped()
    out = []
    for where, record in file_rows(path, "preference file"):
        if max_pairs is not None and len(out) >= max_pairs:
            skipped["over_max_pairs"] += 1  # read but not used: counted, so the report adds up to the file
            continue
        try:
            if isinstance(record, BadRow):
                raise SkipRow(record.reason, record.detail)
            pref = to_preference(record, where, prompt_key, chosen_key, rejected_key)
            if subset_key is not None:
                subset = record.get(subset_key)
                pref = replace(
                    pref, subset="" if subset is None else fields.text(subset, repr(subset_key), "bad_subset")
                )
        except SkipRow as e:
            skipped.add(e.reason, where, str(e))
            continue
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
