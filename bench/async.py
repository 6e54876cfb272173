"""Sync against async (run.mode=async, run.max_staleness=1) on SmolLM2-135M: the same recipe (conf/demo.yaml) and
the same number of samples, one `troupe` process each, one after the other.

Reported per mode: wall time of the iterations after the first (start-up and the first batch, which nothing can
overlap, are left out), samples per second over them, each phase's mean exposed time, the staleness distribution
of the trained rollouts, the truncated importance weights, and the reward of the last iterations (learning should
not suffer from one step of lag).
Run: .venv/bin/python -m bench.async [--iterations 8] [--config demo]
Smoke: .venv/bin/python -m bench.async --smoke [--out FOLDER]: the tiny model (the integration tests' settings),
2 iterations per mode, results.json and the runs under FOLDER (temporary by default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from bench.troupe_run import SMOKE_OVERRIDES, run_troupe, smoke_out

PHASES = ("generate", "score", "learn", "sync")


def summarize(rows: list[dict]) -> dict:
    rows = [r for r in rows if r.get("iteration", -1) >= 0]
    steady = rows[1:]
    seconds = sum(r["time/iteration"] for r in steady)
    samples = sum(r["samples"] for r in steady)
    out = {
        "iterations": len(rows),
        "steady_s": seconds,
        "samples_per_s": samples / seconds,
        **{f"{p}_s": statistics.mean(r.get(f"time/{p}", 0.0) for r in steady) for p in PHASES},
        "reward_last3": statistics.mean(r["reward/mean"] for r in rows[-3:]),
        "accounting_lost": rows[-1]["accounting/lost"],
    }
    lags: dict[str, float] = {}
    for r in steady:
        for key, value in r.items():
            if key.startswith("staleness/frac_"):
                lags[key.removeprefix("staleness/frac_")] = (
                    lags.get(key.removeprefix("staleness/frac_"), 0) + value
                )
    out["staleness"] = {k: v / len(steady) for k, v in sorted(lags.items())}
    weights = [r["train/tis/weight_mean"] for r in steady if "train/tis/weight_mean" in r]
    out["tis_weight_mean"] = statistics.mean(weights) if weights else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--config", default="demo")
    parser.add_argument("--out", default="bench/results/async.json")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model, 2 iterations per mode (--out: a folder)"
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs")
    args = parser.parse_args()
    results = {}
    root = Path(tempfile.mkdtemp(prefix="troupe-async-"))
    if args.smoke:  # two iterations: the first is left out of the steady window, so one remains
        root = smoke_out(None if args.out == parser.get_default("out") else args.out, "async")
        args.out, args.iterations = str(root / "results.json"), 2
        args.overrides = [*SMOKE_OVERRIDES, *args.overrides]
    for mode in ("sync", "async"):
        overrides = [
            f"run.iterations={args.iterations}",
            f"run.mode={mode}",
            "run.max_staleness=1",
            "data.eval=null",
            "run.save_checkpoint=false",
            *args.overrides,
        ]
        rows, wall = run_troupe(args.config, overrides, root / mode)
        results[mode] = {"wall_s": wall, **summarize(rows)}
        print(mode, json.dumps(results[mode]), flush=True)
    results["speedup"] = results["async"]["samples_per_s"] / results["sync"]["samples_per_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(
        "| mode | steady s | samples/s | generate s | score s | learn s | sync s | staleness 0/1 | TIS w | reward (last 3) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode in ("sync", "async"):
        r = results[mode]
        lag = "/".join(f"{r['staleness'].get(k, 0.0):.2f}" for k in ("0", "1"))
        tis = "-" if r["tis_weight_mean"] is None else f"{r['tis_weight_mean']:.3f}"
        print(
            f"| {mode} | {r['steady_s']:.1f} | {r['samples_per_s']:.2f} | {r['generate_s']:.2f} | "
            f"{r['score_s']:.2f} | {r['learn_s']:.2f} | {r['sync_s']:.2f} | {lag} | {tis} | {r['reward_last3']:.3f} |"
        )
    print(f"async / sync throughput: {results['speedup']:.2f}x")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
