"""The hierarchy's value, measured: the demo task (two-step arithmetic, SmolLM2-135M-Instruct, GRPO) with the same
budget under four rewards, 3 seeds each, and the held-out metrics before and after as mean +- sd over the seeds.

- holistic: correctness alone (z-normalised; under GRPO the same advantages as correctness with weight 1);
- weighted_sum: correctness 1 + format 0.3 + length 0.1 + repetition 0.1 for every sample;
- hierarchy: ALaRM, the demo's reward (the aspects count only for correct answers);
- selection: ALaRM with the aspects chosen on the warm-up samples by their agreement with correctness
  (reward.hierarchy.select=consistency).
Each run is `troupe train --config-name demo` in a fresh process with `run.seed` and the variant's overrides; the
evaluation rows before the first and after the last iteration hold the held-out accuracy and the aspect metrics
(format, length, repetition, truncation) over 32 problems x 4 sampled answers. This is the ALaRM paper's
comparison at a small scale; the table says plainly whether the hierarchy wins.
Run: .venv/bin/python -m bench.hierarchy [--seeds 0 1 2] [--iterations 8] [--variants ...]
Smoke: .venv/bin/python -m bench.hierarchy --smoke [--out FOLDER]: the tiny model, 1 iteration, seed 0, the
selection variant (the others differ only in overrides).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench.troupe_run import SMOKE_OVERRIDES, run_troupe, smoke_out

VARIANTS = {
    "holistic": [
        "reward.aggregation=weighted_sum",
        "reward.weights.correctness=1.0",
        "reward.weights.format=0.0",
        "reward.weights.length=0.0",
    ],
    "weighted_sum": [
        "reward.aggregation=weighted_sum",
        "reward.weights.correctness=1.0",
        "reward.weights.format=0.3",
        "reward.weights.length=0.1",
        "+reward.weights.repetition=0.1",
    ],
    "hierarchy": [],
    "selection": ["reward.hierarchy.select=consistency", "reward.hierarchy.min_agreement=0.55"],
}
METRICS = ("accuracy", "objective/format", "objective/length", "objective/repetition", "truncated/frac")
SMOKE = [*SMOKE_OVERRIDES, "eval.prompts=4", "eval.samples=2", "task.steps=1"]


def eval_rows(rows: list[dict]) -> tuple[dict, dict]:
    """The held-out evaluation before training (iteration -1) and after the last iteration."""
    evals = [r for r in rows if "eval/sampled/reward/mean" in r]
    pick = lambda r: {m: r.get(f"eval/sampled/{m}") for m in METRICS}  # noqa: E731
    return pick(evals[0]), pick(evals[-1])


def summarise(values: list[float | None]) -> dict:
    got = [v for v in values if v is not None]
    if not got:
        return {"mean": None, "sd": None}
    return {"mean": statistics.fmean(got), "sd": statistics.stdev(got) if len(got) > 1 else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    out = (
        smoke_out(args.out, "hierarchy")
        if args.smoke or args.out
        else Path("outputs/bench/hierarchy").resolve()
    )
    seeds, iterations, variants = args.seeds, args.iterations, args.variants
    extra: list[str] = []
    if args.smoke:
        seeds, iterations, variants, extra = [0], 1, ["selection"], SMOKE
    results: dict = {"iterations": iterations, "seeds": seeds, "variants": {}}
    for variant in variants:
        runs = []
        for seed in seeds:
            overrides = [*extra, f"run.seed={seed}", f"run.iterations={iterations}", *VARIANTS[variant]]
            rows, wall = run_troupe("demo", overrides, out / variant / f"seed{seed}")
            before, after = eval_rows(rows)
            train = [r for r in rows if r["iteration"] >= 0]
            chosen = {
                k.removeprefix("hierarchy/selected/"): v for k, v in train[-1].items() if "selected/" in k
            }
            runs.append({"seed": seed, "before": before, "after": after, "wall_s": wall, "selected": chosen})
            print(
                f"{variant} seed {seed}: accuracy {before['accuracy']} -> {after['accuracy']} ({wall:.0f} s)"
            )
        results["variants"][variant] = {
            "runs": runs,
            "before": {m: summarise([r["before"][m] for r in runs]) for m in METRICS},
            "after": {m: summarise([r["after"][m] for r in runs]) for m in METRICS},
        }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    fmt = lambda s: "-" if s["mean"] is None else f"{s['mean']:.3f} ± {s['sd']:.3f}"  # noqa: E731
    print(f"\nheld-out, {len(seeds)} seed(s), {iterations} iterations each: before -> after (mean ± sd)")
    print("| reward | " + " | ".join(METRICS) + " |")
    print("|---" * (len(METRICS) + 1) + "|")
    for variant, r in results["variants"].items():
        cells = [f"{fmt(r['before'][m])} -> {fmt(r['after'][m])}" for m in METRICS]
        print(f"| {variant} | " + " | ".join(cells) + " |")
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
