"""Real-data benchmark: RL on public prompts with SmolLM2-135M-Instruct, before and after a fixed budget of generated
samples, over several seeds (mean, standard deviation and each seed's value).

- gsm8k: GRPO on GSM8K train (`conf/gsm8k.yaml`; with --tools `conf/gsm8k_tools.yaml`, the calculator environment),
  greedy accuracy on a dev split carved from it (and sampled accuracy with --eval-samples).
- chat: arena-hard prompts (`conf/chat_armo.yaml`) scored by the ArmoRM bundle that `make bench-rm` writes
  (outputs/bench-rm/stage2) through the ALaRM hierarchy: reward, each ArmoRM objective and the reward-length
  correlation on held-out prompts before and after.

Each seed is one `troupe` run in a fresh process (its own embedded Ray); its metrics.jsonl holds the evaluation
before the first iteration (iteration -1) and after the last. Skips (exit 0, with the reason) without ../shared/data.
Run: .venv/bin/python -m bench.real_data [--part gsm8k chat] [--seeds 0 1 2] [--samples 256]
Smoke: .venv/bin/python -m bench.real_data --smoke [--out FOLDER] [--bundle B]: the tiny model (the integration
tests' settings), one seed, one iteration of 2 prompts x 2 samples, 4 held-out prompts, under FOLDER (temporary by
default); the chat part runs when --bundle names a bundle (the smoke bundle of `bench.reward_models --smoke` will do).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import re
import statistics
from collections.abc import Callable
from pathlib import Path

from bench.rm_data import DATA
from bench.solvable import pass_counts, solvable_rule
from bench.troupe_run import SMOKE_OVERRIDES, run_troupe, smoke_out

GSM8K = DATA / "grade-school-math" / "grade_school_math" / "data" / "train.jsonl"
ARENA_HARD = DATA / "arena-hard-auto" / "data" / "arena-hard-v0.1" / "question.jsonl"
PARTS = {"gsm8k": ("gsm8k", GSM8K), "chat": ("chat_armo", ARENA_HARD)}
# What each part is judged by. Chat: the bundle's raw gated score, comparable before and after; reward/mean is the
# hierarchy's, whose z-statistics before training come from the evaluated batch itself (no warm-up yet).
HEADLINE = {"gsm8k": "accuracy", "chat": "objective/armo"}


def solution_steps(answer: str) -> int:
    """A GSM8K reference solution's steps: its lines before the `#### <number>` line (2 to 9 in train)."""
    return answer.split("####")[0].strip().count("\n") + 1


def solution_ops(answer: str) -> set[str]:
    """The operators a GSM8K solution computes with: in its calculator annotations (`<<48/2=24>>`) and in the
    arithmetic written in its text outside them ("46*7kg"); `x` and `×` count as `*`."""
    annotated = re.findall(r"<<([^=>]*)=", answer)
    written = re.findall(r"\d\s*([-+*/x×])\s*\$?\d", re.sub(r"<<[^>]*>>", " ", answer))
    ops = [c for calc in annotated for c in calc if c in "+-*/x"] + written
    return {"*" if c in "x×" else c for c in ops}


def one_operation(row: dict) -> bool:
    """Whether the reference answer is one operation (+, -, *, /) on two numbers written in the question: a
    problem that needs one calculation, whatever its reference solution's steps."""
    numbers = [float(n.replace(",", "")) for n in re.findall(r"\d[\d,]*(?:\.\d+)?", row["question"])]
    answer = float(row["answer"].split("####")[-1].strip().replace(",", ""))
    results = ((a + b, a - b, a * b, a / b if b else math.nan) for a, b in itertools.permutations(numbers, 2))
    return any(math.isclose(r, answer, abs_tol=1e-9) for rs in results for r in rs)


def subset_rule(max_steps: int | None, ops: str | None, one_op: bool = False):
    """The documented GSM8K subset: solutions of at most `max_steps` steps that compute with only the operators in
    `ops` and carry calculator annotations (None: no bound), and with `one_op` only answers one operation away
    from the question's numbers. Returns the row filter and the subset's name ("" for all of it)."""

    def keeps(row: dict) -> bool:
        answer = row["answer"]
        if max_steps is not None and solution_steps(answer) > max_steps:
            return False
        if one_op and not one_operation(row):
            return False
        return ops is None or ("<<" in answer and solution_ops(answer) <= set(ops))

    name = (
        (f"-max{max_steps}steps" if max_steps is not None else "")
        + (f"-ops{ops}" if ops else "")
        + ("-oneop" if one_op else "")
    )
    return keeps, name


def source_rows(source: Path) -> list[dict]:
    """The source's JSONL rows, each with its line number (`source_line`)."""
    lines = enumerate(source.read_text().splitlines(), 1)
    return [{**json.loads(line), "source_line": i} for i, line in lines if line.strip()]


def carve(source: Path, dev: int, out: Path, seed: int = 0, keeps=None) -> tuple[Path, Path]:
    """A fixed dev split of `dev` rows drawn with `seed`; train is the rest. Rows keep their source line number.
    `keeps`: a row filter applied first (a subset rule: both splits come from it)."""
    rows = source_rows(source)
    if keeps is not None:
        rows = [r for r in rows if keeps(r)]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:dev])
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.jsonl", out / "dev.jsonl"
    for path, keep in zip(paths, (lambda i: i not in held, lambda i: i in held), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for i, r in enumerate(rows) if keep(i)))
    return paths


def before_after(rows: list[dict], mode: str = "greedy") -> tuple[dict, dict]:
    """The `mode` evaluation (greedy or sampled) before the first and after the last iteration."""
    prefix = f"eval/{mode}/"
    evals = [r for r in rows if any(k.startswith(prefix) for k in r)]
    if len(evals) < 2 or evals[0]["iteration"] != -1:
        raise RuntimeError(
            f"metrics.jsonl lacks the {mode} evaluation before the first and after the last iteration"
        )
    first, last = (
        {k.removeprefix(prefix): v for k, v in r.items() if k.startswith(prefix)}
        for r in (evals[0], evals[-1])
    )
    return first, last


def defined(value: float | None) -> bool:
    """False for a metric with no value in a run (logged as null or NaN)."""
    return value is not None and value == value


def spread(values: list[float | None]) -> str:
    """Mean ± sd over seeds; a metric undefined in a seed (a correlation of constant rewards) is left out."""
    seeds = len(values)
    values = [v for v in values if defined(v)]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {sd:.3f}" + (f" ({len(values)}/{seeds} seeds)" if len(values) < seeds else "")


def gsm8k_rules(args, source: Path, data: Path) -> tuple[str, Callable[[dict], bool]]:
    """The GSM8K recipe and row filter that the flags choose: the calculator recipe with --tools; the subset rules
    (steps, operators, one operation), then with --solvable the pass-rate rule on the pool those leave (its pass
    counts cached in `data`/passes.json). Returns (config, the row filter)."""
    keeps, _ = subset_rule(args.max_steps, args.ops, args.one_op)
    config = "gsm8k_tools" if args.tools else "gsm8k"
    if not args.solvable:
        return config, keeps
    pool = [r for r in source_rows(source) if keeps(r)]
    print(f"gsm8k: sampling {args.solvable} answers of the base policy to {len(pool)} problems", flush=True)
    solvable = solvable_rule(pass_counts(pool, config, args.overrides, args.solvable, data / "passes.json"))

    def both(row: dict) -> bool:
        return keeps(row) and solvable(row)

    print(f"gsm8k: {sum(map(both, pool))} of {len(pool)} solved at least once", flush=True)
    return config, both


def run_part(part: str, args, out: Path, results: dict) -> None:
    config, source = PARTS[part]
    name = _subset(part, args)
    data = out / part / f"data{name}"
    keeps = None
    if part == "gsm8k":
        config, keeps = gsm8k_rules(args, source, data)
    train_file, dev_file = carve(source, args.dev, data, keeps=keeps)
    per_iteration = args.prompts_per_iteration * args.samples_per_prompt
    iterations = max(1, args.samples // per_iteration)
    overrides = [
        *args.overrides,
        f"data.train={train_file}",
        f"data.eval={dev_file}",
        f"eval.prompts={args.dev}",
        f"data.prompts_per_iteration={args.prompts_per_iteration}",
        f"generator.samples_per_prompt={args.samples_per_prompt}",
        f"run.iterations={iterations}",
    ]
    if args.eval_samples:
        overrides.append(f"eval.samples={args.eval_samples}")
    if part == "chat":
        overrides.append(f"reward.experts.armo.bundle={args.bundle}")
    key = result_key(part, args)
    runs = results.get(key)
    if not runs or runs["overrides"] != overrides:  # reuse finished seeds only for the same settings
        runs = results[key] = {"config": config, "overrides": overrides, "seeds": {}}
    for seed in args.seeds:
        if str(seed) in runs["seeds"]:
            continue
        print(f"{part}: seed {seed}, {iterations} iterations x {per_iteration} samples", flush=True)
        rows, wall = run_troupe(config, [*overrides, f"run.seed={seed}"], out / part / f"seed{seed}{name}")
        before, after = before_after(rows)
        train_rows = [r for r in rows if r["iteration"] >= 0]
        runs["seeds"][str(seed)] = {
            "before": before,
            "after": after,
            "samples": sum(r.get("samples", 0) for r in train_rows),
            "skipped": {k: v for k, v in train_rows[-1].items() if k.startswith("data/skipped/")},
            "wall_s": round(wall, 1),
        }
        if args.eval_samples:
            sampled = before_after(rows, "sampled")
            runs["seeds"][str(seed)]["sampled"] = dict(zip(("before", "after"), sampled, strict=True))
        (out / "results.json").write_text(json.dumps(results, indent=2))  # a finished seed is never lost
        print(
            f"  before {_headline(part, before)}  after {_headline(part, after)}  ({wall:.0f} s)", flush=True
        )


def _subset(part: str, args) -> str:
    """The GSM8K subset's name ("" for all of it and for other parts): its folders and its results.json entry."""
    if part != "gsm8k":
        return ""
    _, name = subset_rule(args.max_steps, args.ops, args.one_op)
    solvable = f"-solvable{args.solvable}" if args.solvable else ""
    return name + ("-tools" if args.tools else "") + solvable


def result_key(part: str, args) -> str:
    """The part's entry in results.json: a GSM8K subset (or the calculator recipe) is its own entry."""
    return part + _subset(part, args)


def _headline(part: str, row: dict) -> str:
    key = HEADLINE[part]
    return f"{key} {row[key]:.3f}" if defined(row.get(key)) else f"{key} n/a"


def table(part: str, runs: dict, title: str, mode: str = "greedy") -> str:
    """The before/after table of one results.json entry (`title`: its key), of its greedy or sampled evaluation."""
    seeds = runs["seeds"]
    evals = [s if mode == "greedy" else s[mode] for s in seeds.values()]
    befores = [e["before"] for e in evals]
    afters = [e["after"] for e in evals]
    keys = [HEADLINE[part]]
    keys += sorted(
        k
        for k in afters[0]
        if k.startswith("objective/") and k != HEADLINE[part] and not k.startswith("objective/gate/")
    )
    more = ["reward/mean", "reward/length_corr", "response_tokens/mean", "truncated/frac"]
    keys += [k for k in (*more, "env/tool_call_rate", "env/turns") if k in afters[0]]
    lines = [
        f"| {title} ({mode}, held-out) | before | after | after - before | per seed (after) |",
        "|---|---|---|---|---|",
    ]
    for key in keys:
        b = [r[key] for r in befores]
        a = [r[key] for r in afters]
        d = [y - x if defined(x) and defined(y) else None for x, y in zip(b, a, strict=True)]
        per_seed = ", ".join(f"{v:.3f}" if defined(v) else "n/a" for v in a)
        lines.append(f"| {key} | {spread(b)} | {spread(a)} | {spread(d)} | {per_seed} |")
    walls = [s["wall_s"] for s in seeds.values()]
    samples = {s["samples"] for s in seeds.values()}
    lines.append(
        f"\nseeds {', '.join(seeds)}; {'/'.join(map(str, samples))} generated training samples per seed; "
        f"{statistics.fmean(walls):.0f} s per run"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", nargs="+", choices=sorted(PARTS), default=sorted(PARTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=256, help="generated training samples per run")
    parser.add_argument("--prompts-per-iteration", type=int, default=8)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument(
        "--max-steps",
        type=int,
        help="gsm8k: only problems whose reference solution has at most this many steps (train and dev)",
    )
    parser.add_argument(
        "--ops", help="gsm8k: only problems whose annotated calculations use only these operators, e.g. '+-'"
    )
    parser.add_argument(
        "--one-op",
        action="store_true",
        help="gsm8k: only problems whose answer is one operation on two numbers of the question",
    )
    parser.add_argument(
        "--tools", action="store_true", help="gsm8k: the calculator environment (conf/gsm8k_tools.yaml)"
    )
    parser.add_argument(
        "--solvable",
        type=int,
        default=0,
        metavar="K",
        help="gsm8k: only problems the base policy answers right at least once in K samples (bench/solvable.py)",
    )
    parser.add_argument("--dev", type=int, default=128, help="held-out prompts carved from the source")
    parser.add_argument(
        "--eval-samples", type=int, default=0, help="also this many sampled answers per held-out prompt"
    )
    parser.add_argument(
        "--bundle", default="outputs/bench-rm/stage2", help="the ArmoRM bundle (make bench-rm)"
    )
    parser.add_argument("--out", default="outputs/bench-real")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model, 1 seed, 1 iteration of 2 x 2, 4 held-out prompts"
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    if args.solvable and (args.tools or args.smoke):
        parser.error(
            "--solvable samples one reply per problem (not --tools) from the whole pool (not --smoke)"
        )
    if not DATA.is_dir():
        print(f"skipped: {DATA} is absent (the public data this benchmark reads)")
        return 0
    if args.smoke:
        args.out = str(smoke_out(None if args.out == parser.get_default("out") else args.out, "real"))
        args.seeds, args.samples, args.dev = [0], 4, 4
        args.prompts_per_iteration, args.samples_per_prompt = 2, 2
        args.overrides = [*SMOKE_OVERRIDES, *args.overrides]
    if "chat" in args.part and not (Path(args.bundle) / "bundle.json").is_file():
        print(f"chat part skipped: no bundle at {args.bundle}; run `make bench-rm` first")
        args.part = [p for p in args.part if p != "chat"]
    out = Path(args.out).resolve()
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for part in args.part:
        run_part(part, args, out, results)
    for part in args.part:
        key = result_key(part, args)
        print("\n" + table(part, results[key], key))
        if args.eval_samples:
            print("\n" + table(part, results[key], key, "sampled"))
    print(f"results: {results_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
