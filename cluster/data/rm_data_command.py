"""The `troupe rm data` command: the files the readers in `rm_data` build, written atomically, with the option
checks and the dropped-record report (usage in `rm_data`'s docstring)."""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

from troupe.cluster.data.rm_data import (
    PAIR_SOURCES,
    MissingData,
    hh_pairs,
    pair_record,
    pandalm_pairs,
    ratings_rows,
    scales,
    split,
)


def _write_atomic(path: Path, write) -> None:
    """`write(file)` into a fresh temporary file beside `path`, then renamed over it: a crash leaves the old file,
    and an existing `<path>.tmp` (or a link) is never written through."""
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # as open() would make it: mkstemp's 0600 would hide it from other users
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_jsonl(path: Path, rows) -> None:
    _write_atomic(path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def build_ratings(
    data_dir: str | Path,
    out: str | Path,
    max_rows: int | None = None,
    seed: int = 0,
    scales_out=None,
    max_d2t: int = 300,
) -> dict:
    """Writes the ratings file and its scales YAML; returns a summary."""
    import yaml

    out = Path(out)
    scales_path = Path(scales_out) if scales_out else out.with_name("scales.yaml")
    if scales_path.resolve() == out.resolve():
        raise ValueError(
            f"--out and --scales are the same file ({out}): the scales would replace the ratings"
        )
    rows, dropped = ratings_rows(data_dir, max_d2t, seed)
    total = len(rows)
    if max_rows is not None and max_rows < total:
        rows = random.Random(seed).sample(rows, max_rows)
        dropped["over_max_rows"] += total - max_rows
    if not rows:
        raise ValueError(f"no rated response kept from {data_dir}; dropped by reason {dropped.report()}")
    _write_jsonl(out, rows)
    found = scales(rows)
    header = f"# {{objective: [lo, hi]}}: the rating scale of each objective in {out.name} (rm.scales_path)\n"
    body = yaml.safe_dump(
        {k: [lo, hi] for k, (lo, hi) in found.items()}, sort_keys=False, default_flow_style=None
    )
    _write_atomic(scales_path, lambda f: f.write(header + body))
    counts = {k: sum(1 for r in rows if k in r) for k in found}
    return {"out": str(out), "scales": str(scales_path), "rows": len(rows), "of": total, "objectives": counts,
            "dropped": dropped.report()}  # fmt: skip


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
    if not sources or len(set(sources)) != len(sources):
        raise ValueError(f"--source {','.join(sources)!r}: name each of {', '.join(PAIR_SOURCES)} once")
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
        dropped[PAIR_SOURCES[source]] = why.report()
    random.Random(seed).shuffle(kept)
    over = 0
    if max_pairs is not None and len(kept) > max_pairs:
        over, kept = len(kept) - max_pairs, kept[:max_pairs]
    if not kept:
        raise ValueError(f"no pair kept from {', '.join(sources)}; dropped by reason {dropped}")
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


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive count, got {text}")
    return value


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
    r.add_argument(
        "--max-rows", type=_positive, default=None, help="a seeded random subset of the rated responses"
    )
    r.add_argument(
        "--max-d2t",
        type=_positive,
        default=300,
        help="data-to-text rows sampled (of 2056; the rest are counted)",
    )
    r.add_argument("--seed", type=int, default=0)
    q = sub.add_parser("pairs", help="preference pairs for rm.stage=gating|probe|bt|haf and rm eval")
    q.add_argument("--source", default="hh-rlhf", help="hh-rlhf, pandalm, or both comma-separated")
    q.add_argument("--data-dir", required=True, help="the public data folder (shared/data)")
    q.add_argument("--out", default="pairs.jsonl")
    q.add_argument("--split", choices=("train", "test", "all"), default="all")
    q.add_argument("--test-fraction", type=float, default=0.2)
    q.add_argument("--max-pairs", type=_positive, default=None, help="keep a seeded random N of the pairs")
    q.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        print(f"troupe rm data: error: --data-dir {data_dir} is not a folder", file=sys.stderr)
        return 2
    outputs = [Path(args.out)] + ([Path(args.scales)] if getattr(args, "scales", None) else [])
    inside = [o for o in outputs if o.resolve().is_relative_to(data_dir.resolve())]
    if inside:
        print(
            f"troupe rm data: error: {inside[0]} is inside --data-dir {data_dir}: write elsewhere",
            file=sys.stderr,
        )
        return 2
    try:
        if args.kind == "ratings":
            s = build_ratings(data_dir, args.out, args.max_rows, args.seed, args.scales, args.max_d2t)
            print(
                f"wrote {s['out']}: {s['rows']} rated responses (of {s['of']}); scales in {s['scales']}\n"
                "objectives (rated rows): "
                + ", ".join(f"{k} {n}" for k, n in s["objectives"].items())
                + f"\ndropped by reason {s['dropped']}"
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
    except (MissingData, ValueError, OSError) as e:
        print(f"troupe rm data: error: {e}", file=sys.stderr)
        return 2
    return 0
