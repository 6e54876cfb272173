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

import argparse
import ast
import csv
import gzip
import json
import random
import sys
from collections import Counter
from pathlib import Path

from troupe.cluster.data.preferences import Preference, parse_transcript

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


def _scores(value) -> dict:
    return value if isinstance(value, dict) else ast.literal_eval(value)


def ratings_rows(data_dir: str | Path, max_d2t: int = 300, seed: int = 0) -> list[dict]:
    """Every rated response (Topical-Chat, `max_d2t` random data-to-text rows, QAGS, XSTest) with verbosity."""
    rng = random.Random(seed)
    rows: list[dict] = []
    for x in json.loads(_file(data_dir, TOPICAL_CHAT).read_text()):
        s = _scores(x["scores"])
        prompt = (
            f"Fact: {x['context'].strip()}\nDialogue so far: {x['source'].strip()}\nReply to the dialogue."
        )
        rows.append(
            {"prompt": prompt, "response": x["system_output"], **{f"chat_{k}": v for k, v in s.items()}}
        )
    d2t = []
    for name in DATA_TO_TEXT:
        d2t += json.loads(_file(data_dir, name).read_text())
    for x in rng.sample(d2t, min(max_d2t, len(d2t))):
        s = _scores(x["scores"])
        prompt = f"Write this dialogue act as one sentence: {x['source']}"
        rows.append(
            {"prompt": prompt, "response": x["system_output"], **{f"d2t_{k}": v for k, v in s.items()}}
        )
    for name in QAGS:
        for x in json.loads(_file(data_dir, name).read_text()):
            prompt = "Summarise the article in one sentence:\n" + " ".join(x["source"].split()[:200])
            rows.append(
                {
                    "prompt": prompt,
                    "response": x["system_output"],
                    "consistency": _scores(x["scores"])["consistency"],
                }
            )
    for name in XSTEST:
        with open(_file(data_dir, name), newline="", encoding="utf-8") as f:
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
) -> tuple[list[Preference], Counter]:
    out, dropped = [], Counter()
    with gzip.open(_file(data_dir, HH_RLHF), "rt", encoding="utf-8") as f:
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
    if limit is not None:
        dropped["over_limit"] += max(0, len(out) - limit)
        out = out[:limit]
    return out, dropped


def pandalm_pairs(data_dir: str | Path, seed: int = 0) -> tuple[list[Preference], Counter]:
    out, dropped = [], Counter()
    for x in json.loads(_file(data_dir, PANDALM).read_text()):
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


def pair_record(p: Preference) -> dict:
    return {
        "prompt": p.prompt,
        "chosen": p.chosen,
        "rejected": p.rejected,
        "subset": p.subset,
        "source": p.source,
    }


def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def build_ratings(
    data_dir: str | Path, out: str | Path, max_rows: int | None = None, seed: int = 0, scales_out=None
) -> dict:
    """Writes the ratings file and its scales YAML; returns a summary."""
    import yaml

    rows = ratings_rows(data_dir, seed=seed)
    total = len(rows)
    if max_rows is not None and max_rows < total:
        rows = random.Random(seed).sample(rows, max_rows)
    out = Path(out)
    scales_path = Path(scales_out) if scales_out else out.with_name("scales.yaml")
    _write_jsonl(out, rows)
    found = scales(rows)
    scales_path.write_text(
        "# {objective: [lo, hi]}: the rating scale of each objective in "
        + out.name
        + " (rm.scales_path)\n"
        + yaml.safe_dump(
            {k: [lo, hi] for k, (lo, hi) in found.items()}, sort_keys=False, default_flow_style=None
        )
    )
    counts = {k: sum(1 for r in rows if k in r) for k in found}
    return {"out": str(out), "scales": str(scales_path), "rows": len(rows), "of": total, "objectives": counts}


def build_pairs(
    data_dir: str | Path,
    out: str | Path,
    sources: list[str],
    split_name: str = "all",
    test_fraction: float = 0.2,
    max_pairs: int | None = None,
    seed: int = 0,
) -> dict:
    """Writes the preference file; each source is split on its own (train: the first 1 - test_fraction of its
    seeded shuffle, test: the rest), then the sources are merged, shuffled and cut to max_pairs."""
    kept, dropped = [], {}
    for source in sources:
        if source not in PAIR_SOURCES:
            raise ValueError(f"--source {source!r}: one of {', '.join(PAIR_SOURCES)}")
        if source == "hh-rlhf":
            prefs, why = hh_pairs(data_dir, None, seed)
        else:
            prefs, why = pandalm_pairs(data_dir, seed)
        if split_name != "all":
            train, test = split(prefs, test_fraction)
            prefs = train if split_name == "train" else test
        kept += prefs
        dropped[PAIR_SOURCES[source]] = dict(why)
    random.Random(seed).shuffle(kept)
    over = 0
    if max_pairs is not None and len(kept) > max_pairs:
        over, kept = len(kept) - max_pairs, kept[:max_pairs]
    _write_jsonl(Path(out), (pair_record(p) for p in kept))
    subsets = Counter(p.subset for p in kept)
    return {
        "out": str(out),
        "pairs": len(kept),
        "split": split_name,
        "subsets": dict(subsets),
        "dropped": dropped,
        "over_max_pairs": over,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="troupe rm data",
        description="Build reward-model files (ratings for stage 1, preference pairs for stage 2 / probe / bt / "
        "haf / rm eval) from the public data folder.",
    )
    sub = p.add_subparsers(dest="kind", required=True)
    r = sub.add_parser("ratings", help="rated responses for rm.stage=regression, plus scales.yaml")
    r.add_argument("--data-dir", required=True, help="the public data folder (shared/data)")
    r.add_argument("--out", default="ratings.jsonl")
    r.add_argument(
        "--scales", default=None, help="the scales YAML to write (default: scales.yaml beside --out)"
    )
    r.add_argument("--max-rows", type=int, default=None, help="a seeded random subset of the rated responses")
    r.add_argument("--seed", type=int, default=0)
    q = sub.add_parser("pairs", help="preference pairs for rm.stage=gating|probe|bt|haf and rm eval")
    q.add_argument("--source", default="hh-rlhf", help="hh-rlhf, pandalm, or both comma-separated")
    q.add_argument("--data-dir", required=True, help="the public data folder (shared/data)")
    q.add_argument("--out", default="pairs.jsonl")
    q.add_argument("--split", choices=("train", "test", "all"), default="all")
    q.add_argument("--test-fraction", type=float, default=0.2)
    q.add_argument("--max-pairs", type=int, default=None, help="keep a seeded random N of the pairs")
    q.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        print(f"troupe rm data: error: --data-dir {data_dir} is not a folder", file=sys.stderr)
        return 2
    try:
        if args.kind == "ratings":
            s = build_ratings(data_dir, args.out, args.max_rows, args.seed, args.scales)
            print(
                f"wrote {s['out']}: {s['rows']} rated responses (of {s['of']}); scales in {s['scales']}\n"
                "objectives (rated rows): " + ", ".join(f"{k} {n}" for k, n in s["objectives"].items())
            )
            print(
                f"next: troupe rm train rm.stage=regression rm.ratings_path={s['out']} rm.scales_path={s['scales']}"
            )
        else:
            if not 0.0 < args.test_fraction < 1.0:
                raise ValueError(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
            sources = [s.strip() for s in args.source.split(",") if s.strip()]
            s = build_pairs(
                data_dir, args.out, sources, args.split, args.test_fraction, args.max_pairs, args.seed
            )
            print(
                f"wrote {s['out']}: {s['pairs']} pairs ({s['split']} split), subsets {s['subsets']}; "
                f"dropped by reason {s['dropped']}, over --max-pairs {s['over_max_pairs']}"
            )
    except (MissingData, ValueError) as e:
        print(f"troupe rm data: error: {e}", file=sys.stderr)
        return 2
    return 0
