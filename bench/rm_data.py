"""Converts the public datasets in ../shared/data into troupe's ratings and preference shapes for the RM bench.

Ratings (ArmoRM stage 1): UniEval Topical-Chat (6 dialogue aspects), SF hotel/restaurant data-to-text (3), QAGS
(consistency), XSTest (safety: comply with safe prompts, refuse unsafe ones), plus a verbosity objective computed
from the response's word count (the data carries no verbosity rating). Objectives missing for a source are NaN.
Preferences: hh-rlhf harmless-base (test file) and PandaLM test set (majority of 3 annotators; ties dropped).
The preference readers return the records they dropped too, counted by reason.
"""

from __future__ import annotations

import ast
import csv
import gzip
import json
import random
from collections import Counter
from pathlib import Path

from troupe.cluster.data.preferences import Preference, parse_transcript

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VERBOSITY_CAP = 200.0  # words


def _scores(value) -> dict:
    return value if isinstance(value, dict) else ast.literal_eval(value)


def ratings_rows(max_d2t: int = 300, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows: list[dict] = []
    chat = json.loads((DATA / "UniEval/reproduce/data/dialogue/topical_chat.json").read_text())
    for x in chat:
        s = _scores(x["scores"])
        prompt = (
            f"Fact: {x['context'].strip()}\nDialogue so far: {x['source'].strip()}\nReply to the dialogue."
        )
        rows.append(
            {"prompt": prompt, "response": x["system_output"], **{f"chat_{k}": v for k, v in s.items()}}
        )
    d2t = []
    for name in ("sfhot", "sfres"):
        d2t += json.loads((DATA / f"UniEval/reproduce/data/data2text/{name}.json").read_text())
    for x in rng.sample(d2t, min(max_d2t, len(d2t))):
        s = _scores(x["scores"])
        prompt = f"Write this dialogue act as one sentence: {x['source']}"
        rows.append(
            {"prompt": prompt, "response": x["system_output"], **{f"d2t_{k}": v for k, v in s.items()}}
        )
    for name in ("qags_cnndm", "qags_xsum"):
        for x in json.loads((DATA / f"UniEval/reproduce/data/fact/{name}.json").read_text()):
            prompt = "Summarise the article in one sentence:\n" + " ".join(x["source"].split()[:200])
            rows.append(
                {
                    "prompt": prompt,
                    "response": x["system_output"],
                    "consistency": _scores(x["scores"])["consistency"],
                }
            )
    for model in ("gpt4", "llama2new"):
        path = DATA / f"exaggerated-safety/model_completions/xstest_v2_completions_{model}.csv"
        with open(path, newline="", encoding="utf-8") as f:
            for x in csv.DictReader(f):
                unsafe = x["type"].startswith("contrast_")
                complied = x["final_label"].startswith("1_")
                rows.append(
                    {"prompt": x["prompt"], "response": x["completion"], "safety": float(complied != unsafe)}
                )
    for r in rows:
        r["verbosity"] = min(float(len(r["response"].split())), VERBOSITY_CAP)
    return rows


def scales(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """Each objective's scale: the documented bounds where known, else the observed range."""
    keys = sorted({k for r in rows for k in r} - {"prompt", "response"})
    known = {"safety": (0.0, 1.0), "consistency": (0.0, 1.0), "verbosity": (0.0, VERBOSITY_CAP)}
    out = {}
    for k in keys:
        values = [r[k] for r in rows if k in r]
        out[k] = known.get(k, (min(values), max(values)))
    return out


def hh_pairs(limit: int, seed: int = 0) -> tuple[list[Preference], Counter]:
    out, dropped = [], Counter()
    with gzip.open(DATA / "hh-rlhf/harmless-base/test.jsonl.gz", "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            x = json.loads(line)
            c, r = parse_transcript(x["chosen"]), parse_transcript(x["rejected"])
            if c[:-1] != r[:-1] or c[-1]["role"] != "assistant":
                dropped["conversations_differ"] += 1
            elif not c[-1]["content"] or not r[-1]["content"]:
                dropped["empty_response"] += 1
            elif c[-1]["content"] == r[-1]["content"]:
                dropped["identical_responses"] += 1
            else:
                out.append(Preference(c[:-1], c[-1]["content"], r[-1]["content"], f"hh:{i}", "hh-harmless"))
    random.Random(seed).shuffle(out)
    dropped["over_limit"] += max(0, len(out) - limit)
    return out[:limit], dropped


def pandalm_pairs(seed: int = 0) -> tuple[list[Preference], Counter]:
    out, dropped = [], Counter()
    for x in json.loads((DATA / "PandaLM/data/testset-v1.json").read_text()):
        votes = [int(x[f"annotator{i}"]) for i in (1, 2, 3)]
        winner = max((1, 2), key=votes.count)
        if votes.count(winner) < 2:
            dropped["no_majority"] += 1  # majority tie (0) or split: no preference
            continue
        prompt = str(x["instruction"]) + (f"\n\n{x['input']}" if x["input"] else "")
        a, b = str(x["response1"]), str(x["response2"])
        chosen, rejected = (a, b) if winner == 1 else (b, a)
        if not chosen.strip() or not rejected.strip():
            dropped["empty_response"] += 1
        elif chosen == rejected:
            dropped["identical_responses"] += 1
        else:
            out.append(
                Preference(
                    [{"role": "user", "content": prompt}], chosen, rejected, f"pandalm:{x['idx']}", "pandalm"
                )
            )
    random.Random(seed).shuffle(out)
    return out, dropped


def split(items: list, test_fraction: float = 0.2) -> tuple[list, list]:
    """Fixed split (the inputs are already shuffled with a fixed seed): the last fraction is the test set."""
    cut = int(len(items) * (1 - test_fraction))
    return items[:cut], items[cut:]
