"""`troupe rm data`: reward-model files built from the public datasets (the folder described in shared/data's
README), in the shapes `troupe rm train` / `troupe rm eval` read.

  troupe rm data ratings --data-dir ../shared/data --out ratings.jsonl [--max-rows N] [--seed S]
      one rated response per line ({"prompt", "response", <objective>: rating, ...}) plus `scales.yaml` beside
      it ({objective: [lo, hi]}) for `rm.scales_path`.
  troupe rm data pairs --source hh-rlhf,pandalm --data-dir ../shared/data --out pairs.jsonl
                       [--split train|test|all] [--test-fraction 0.2] [--max-pairs N] [--seed S]
      preference pairs ({"prompt": [messages], "chosen", "rejected", "subset", "source"}); `--split` takes a fixed
      seeded split, so `--split train` and `--split test` with the same seed never share a pair.

Ratings (ArmoRM stage 1). Objectives, with the scale each rating is on:
  chat_understandability [0, 1], chat_naturalness [1, 3], chat_coherence [1, 3], chat_engagingness [1, 3],
  chat_groundedness [0, 1], chat_overall [1, 5]   UniEval Topical-Chat (dialogue replies)
  d2t_informativeness, d2t_naturalness, d2t_overall [1, 6]   UniEval SF hotel / restaurant data-to-text
  consistency [0, 1]     UniEval QAGS (CNN/DM, XSum summaries: factual consistency)
  safety [0, 1]          XSTest completions: 1 = complied with a safe prompt or refused an unsafe one
  verbosity [0, 200]     the response's word count, capped at 200 (no source rates verbosity)
Each row carries only its source's objectives (the others are missing, ignored for that objective).
Preferences: hh-rlhf harmless-base (test file; subset `hh-harmless`) and the PandaLM test set (majority of its 3
annotators, ties dropped; subset `pandalm`). Records dropped while reading are counted by reason and printed.
"""

from __future__ import annotations

import ast
import csv
import random
from pathlib import Path

from troupe.cluster.data.preferences import Preference, parse_transcript
from troupe.cluster.data.records import BadRow, Skipped, json_document, jsonl_rows

VERBOSITY_CAP = 200.0  # words

# The files each source reads, relative to --data-dir.
TOPICAL_CHAT = "UniEval/reproduce/data/dialogue/topical_chat.json"
DATA_TO_TEXT = ("UniEval/reproduce/data/data2text/sfhot.json", "UniEval/reproduce/data/data2text/sfres.json")
QAGS = ("UniEval/reproduce/data/fact/qags_cnndm.json", "UniEval/reproduce/data/fact/qags_xsum.json")
XSTEST = tuple(
    f"exaggerated-safety/model_completions/xstest_v2_completions_{m}.csv" for m in ("gpt4", "llama2new")
)
HH_RLHF = "hh-rlhf/harmless-base/test.jsonl.gz"
PANDALM = "PandaLM/data/testset-v1.json"
PAIR_SOURCES = {"hh-rlhf": "hh-harmless", "pandalm": "pandalm"}  # --source name: subset name

# The documented scale of every objective (the rating scales of the source annotations).
SCALES: dict[str, tuple[float, float]] = {
    "chat_understandability": (0.0, 1.0),
    "chat_naturalness": (1.0, 3.0),
    "chat_coherence": (1.0, 3.0),
    "chat_engagingness": (1.0, 3.0),
    "chat_groundedness": (0.0, 1.0),
    "chat_overall": (1.0, 5.0),
    "d2t_informativeness": (1.0, 6.0),
    "d2t_naturalness": (1.0, 6.0),
    "d2t_overall": (1.0, 6.0),
    "consistency": (0.0, 1.0),
    "safety": (0.0, 1.0),
    "verbosity": (0.0, VERBOSITY_CAP),
}


class MissingData(FileNotFoundError):
    pass


def _file(data_dir: str | Path, relative: str) -> Path:
    path = Path(data_dir) / relative
    if not path.exists():
        raise MissingData(
            f"{path} not found: --data-dir must be the public data folder (shared/data, see its README.md); "
            f"this source needs {relative}"
        )
    return path


MAX_SCORES_CHARS = 10_000  # a `scores` field written as a Python literal: parsed only up to this size


def _scores(value) -> dict:
    if isinstance(value, dict):
        return value
    if not isinstance(value, str) or len(value) > MAX_SCORES_CHARS:
        raise ValueError("scores is neither a mapping nor a short literal")
    parsed = ast.literal_eval(value)
    if not isinstance(parsed, dict):
        raise ValueError("scores is not a mapping")
    return parsed


def _rating(objective: str, value) -> float:
    """A rating as a float on its objective's documented scale, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{objective} rating {value!r} is not a number")
    lo, hi = SCALES.get(objective, (float("-inf"), float("inf")))
    if not lo <= value <= hi:  # NaN fails too
        raise ValueError(f"{objective} rating {value!r} is outside its scale [{lo:g}, {hi:g}]")
    return float(value)


def _json_list(path: Path) -> list:
    data = json_document(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


BAD_RECORD = (KeyError, TypeError, ValueError, AttributeError, SyntaxError, RecursionError, MemoryError)


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:200]


def ratings_rows(data_dir: str | Path, max_d2t: int = 300, seed: int = 0) -> tuple[list[dict], Skipped]:
    """Every rated response (Topical-Chat, `max_d2t` random data-to-text rows, QAGS, XSTest) with verbosity, and
    the records skipped (by reason: a missing field, a rating off its scale, an unknown label, not sampled)."""
    rng = random.Random(seed)
    rows: list[dict] = []
    dropped = Skipped()

    def rated(where: str, x, make) -> None:
        try:
            rows.append(make(x))
        except BAD_RECORD as e:
            dropped.add("bad_record", f"{where}: {_why(e)}")

    def chat(x) -> dict:
        prompt = (
            f"Fact: {x['context'].strip()}\nDialogue so far: {x['source'].strip()}\nReply to the dialogue."
        )
        ratings = {f"chat_{k}": _rating(f"chat_{k}", v) for k, v in _scores(x["scores"]).items()}
        return {"prompt": prompt, "response": _text(x["system_output"]), **ratings}

    def d2t(x) -> dict:
        prompt = f"Write this dialogue act as one sentence: {_text(x['source'])}"
        ratings = {f"d2t_{k}": _rating(f"d2t_{k}", v) for k, v in _scores(x["scores"]).items()}
        return {"prompt": prompt, "response": _text(x["system_output"]), **ratings}

    def qags(x) -> dict:
        prompt = "Summarise the article in one sentence:\n" + " ".join(_text(x["source"]).split()[:200])
        consistency = _rating("consistency", _scores(x["scores"])["consistency"])
        return {"prompt": prompt, "response": _text(x["system_output"]), "consistency": consistency}

    def xstest(x) -> dict:
        complied_unsafe = (x["final_label"].startswith("1_"), x["type"].startswith("contrast_"))
        safety = float(
            complied_unsafe[0] != complied_unsafe[1]
        )  # complied with a safe prompt or refused an unsafe
        return {"prompt": _text(x["prompt"]), "response": _text(x["completion"]), "safety": safety}

    path = _file(data_dir, TOPICAL_CHAT)
    for i, x in enumerate(_json_list(path)):
        rated(f"{path} record {i}", x, chat)
    d2t_records = [
        (name, i, x) for name in DATA_TO_TEXT for i, x in enumerate(_json_list(_file(data_dir, name)))
    ]
    for name, i, x in rng.sample(d2t_records, min(max_d2t, len(d2t_records))):
        rated(f"{Path(data_dir) / name} record {i}", x, d2t)
    if len(d2t_records) > max_d2t:
        dropped["d2t_not_sampled (--max-d2t)"] += len(d2t_records) - max_d2t
    for name in QAGS:
        path = _file(data_dir, name)
        for i, x in enumerate(_json_list(path)):
            rated(f"{path} record {i}", x, qags)
    for name in XSTEST:
        path = _file(data_dir, name)
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            for x in reader:
                where = f"{path}:{reader.line_num}"  # the record's last line (completions span lines)
                label = x.get("final_label") or ""
                if not label.startswith(("1_", "2_", "3_")):  # full compliance, full / partial refusal
                    dropped.add("unknown_label", f"{where}: final_label {label!r}")
                    continue
                rated(where, x, xstest)
    kept = []
    for r in rows:
        if not r["response"].strip():
            dropped["empty_response"] += 1
            continue
        r["verbosity"] = min(float(len(r["response"].split())), VERBOSITY_CAP)
        kept.append(r)
    return kept, dropped


def _text(value) -> str:
    """A text field; a JSON scalar as Python writes it (PandaLM has answers such as `false`: "False")."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return str(value)
    raise TypeError(f"expected text, got {type(value).__name__}")


def scales(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """Each objective present in `rows` on its documented scale (the observed range for an unknown one)."""
    keys = sorted({k for r in rows for k in r} - {"prompt", "response"})
    out = {}
    for k in keys:
        if k in SCALES:
            out[k] = SCALES[k]
        else:
            values = [r[k] for r in rows if k in r]
            lo, hi = float(min(values)), float(max(values))
            out[k] = (lo, hi if hi > lo else lo + 1.0)
    return out


def hh_pairs(
    data_dir: str | Path, limit: int | None = None, seed: int = 0
) -> tuple[list[Preference], Skipped]:
    out, dropped = [], Skipped()
    path = _file(data_dir, HH_RLHF)
    for i, x in jsonl_rows(path):
        if isinstance(x, BadRow):
            dropped.add("line_too_long" if x.reason == "line_too_long" else "bad_record", x.where, x.detail)
            continue
        try:
            c, r = parse_transcript(_text(x["chosen"])), parse_transcript(_text(x["rejected"]))
        except BAD_RECORD as e:
            dropped.add("bad_record", f"{path}:{i}", _why(e))
            continue
        if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
            dropped.add("not_assistant_turn", f"{path}:{i}")
        elif c[:-1] != r[:-1]:
            dropped["conversations_differ"] += 1
        elif not c[-1]["content"] or not r[-1]["content"]:
            dropped["empty_response"] += 1
        elif c[-1]["content"] == r[-1]["content"]:
            dropped["identical_responses"] += 1
        else:
            out.append(Preference(c[:-1], c[-1]["content"], r[-1]["content"], f"hh:{i}", "hh-harmless"))
    random.Random(seed).shuffle(out)
    if limit is not None:
        dropped["over_limit"] += max(0, len(out) - limit)
        out = out[:limit]
    return out, dropped


def pandalm_pairs(data_dir: str | Path, seed: int = 0) -> tuple[list[Preference], Skipped]:
    out, dropped = [], Skipped()
    path = _file(data_dir, PANDALM)
    for i, x in enumerate(_json_list(path)):
        try:
            votes = [int(x[f"annotator{k}"]) for k in (1, 2, 3)]
            prompt = _text(x["instruction"]) + (f"\n\n{_text(x['input'])}" if x.get("input") else "")
            a, b, idx = _text(x["response1"]), _text(x["response2"]), x["idx"]
        except BAD_RECORD as e:
            dropped.add("bad_record", f"{path} record {i}: {_why(e)}")
            continue
        winner = max((1, 2), key=votes.count)
        if votes.count(winner) < 2:
            dropped["no_majority"] += 1  # majority tie (0) or split: no preference
            continue
        chosen, rejected = (a, b) if winner == 1 else (b, a)
        if not chosen.strip() or not rejected.strip():
            dropped["empty_response"] += 1
        elif chosen == rejected:
            dropped["identical_responses"] += 1
        else:
            out.append(
                Preference(
                    [{"role": "user", "content": prompt}], chosen, rejected, f"pandalm:{idx}", "pandalm"
                )
            )
    random.Random(seed).shuffle(out)
    return out, dropped


def split(items: list, test_fraction: float = 0.2) -> tuple[list, list]:
    """Fixed split (the inputs are already shuffled with a fixed seed): the last fraction is the test set."""
    cut = int(len(items) * (1 - test_fraction))
    return items[:cut], items[cut:]


def pair_record(p: Preference) -> dict:
    return {
        "prompt": p.prompt,
        "chosen": p.chosen,
        "rejected": p.rejected,
        "subset": p.subset,
        "source": p.source,
    }
