"""Recovery benchmark: what each kind of failure costs a running job, with the tiny model and SmolLM2-135M.

One in-process run per model (real Ray, vLLM, DeepSpeed) with checkpoints every 2 iterations; a generator, a reward
shard and a learner rank are killed with SIGKILL at fixed iterations. Their cost is the affected iteration's time
minus the median undisturbed iteration of the same run (for the learner: the rebuild plus the iterations redone).
The driver kill is a `troupe` process killed with SIGKILL after its first checkpoint and restarted with
`resume=latest`: its cost is the restart's time to its first new row minus a fresh run's time to its first row.
Checkpoint write time, read time (checksums + DeepSpeed load into the ranks) and size come from the same runs.
Run: .venv/bin/python -m bench.recovery [--models tiny smollm2] [--skip-driver]
Smoke: .venv/bin/python -m bench.recovery --smoke [--out FOLDER] [--skip-driver]: the tiny model only, every kill,
results.json under FOLDER (temporary by default).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MODELS = {
    "tiny": ["model.policy=builtin:tiny-llama", "generator.max_new_tokens=16", "generator.max_model_len=512"],
    "smollm2": ["model.policy=builtin:smollm2-135m-instruct", "generator.max_new_tokens=48"],
}
COMMON = [
    "data.prompts_per_iteration=4",
    "generator.samples_per_prompt=4",
    "learner.world_size=2",  # rank 1 is killed: rank 0 is left waiting in a collective
    "learner.omp_threads=1",
    "learner.micro_batch_size=4",
    "learner.zero_stage=2",
    "ray.num_cpus=2",
    "generator.num_cpus=0.5",
    "run.progress_bar=false",
    "run.print_table=false",
]
ITERATIONS = 8
# (after the row of this iteration, what): the learner after an iteration with no checkpoint write in flight
KILLS = [(1, "generator"), (3, "reward"), (4, "learner")]
EVERY = 2  # checkpoints after iterations 1, 3, 5, 7


def _rows(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def _killer(run, metrics: Path, plans: list, killed: dict, stop: threading.Event) -> None:
    plans = list(plans)
    while plans and not stop.is_set():
        at, what = plans[0]
        if any(r.get("iteration") == at for r in _rows(metrics)):
            if what == "generator":
                pid = run.generators.healthy()[0].info["pid"]
            elif what == "reward":
                pid = run.rewards.pools["rules"].healthy()[0].info["pid"]
            else:
                pid = run.learners.info[1]["pid"]
            os.kill(pid, signal.SIGKILL)
            killed[what] = at + 1  # the iteration it hits
            plans.pop(0)
        time.sleep(0.05)


def in_process(model: str, out: Path) -> dict:
    import ray
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from troupe.actors.models import resolve_model
    from troupe.cluster.config.compose import CONF_DIR
    from troupe.cluster.config.schema import register
    from troupe.cluster.durability.checkpoint import verify
    from troupe.cluster.durability.run_checkpoints import RunCheckpoints, driver_state
    from troupe.cluster.observe.metrics import rl_columns
    from troupe.cluster.run.driver import build_fleet
    from troupe.cluster.run.job import Job
    from troupe.cluster.run.loop import train
    from troupe.cluster.run.runtime import start_ray

    register()
    overrides = [*MODELS[model], *COMMON, f"run.output_dir={out}", f"run.iterations={ITERATIONS}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=overrides))
    model_path = resolve_model(cfg.model.policy)
    start_ray(cfg.ray)
    run = build_fleet(cfg, model_path)
    killed, stop = {}, threading.Event()
    try:
        with Job(cfg, rl_columns([], False, None)) as job:
            job.start("bench")
            checkpoints = RunCheckpoints(out, EVERY, 2, model_path)
            checkpoints.initial = driver_state(run, -1)
            writes = []
            save = checkpoints.save

            def timed_save(r, it, state=None):
                folder = save(r, it, state)
                writes.append(dict(checkpoints.stats))
                return folder

            checkpoints.save = timed_save
            thread = threading.Thread(
                target=_killer, args=(run, out / "metrics.jsonl", KILLS, killed, stop), daemon=True
            )
            thread.start()
            started = time.perf_counter()
            train(run, job, checkpoints)
            wall = time.perf_counter() - started
            stop.set()
            start_read = time.perf_counter()
            verify(checkpoints.last)
            verify_s = time.perf_counter() - start_read
            checkpoints.load_ranks(run, checkpoints.last)
            read_s = time.perf_counter() - start_read
        rows = {r["iteration"]: r for r in _rows(out / "metrics.jsonl")}
    finally:
        stop.set()
        run.shutdown()
        ray.shutdown()
    hit = set(killed.values())
    normal = statistics.median(r["time/iteration"] for i, r in rows.items() if i >= 1 and i not in hit)
    result = {"iteration_s": normal, "wall_s": wall, "killed": killed}
    for what in ("generator", "reward"):
        result[f"{what}_s"] = rows[killed[what]]["time/iteration"] - normal
    # the learner: the rebuild, then the iterations redone since the newest checkpoint before the one it hit
    hit = killed["learner"]
    redone = hit - max(i for i in range(hit) if (i + 1) % EVERY == 0) - 1
    result["learner_s"] = checkpoints.stats["recover_s"] + redone * normal
    result["learner_rebuild_s"] = checkpoints.stats["recover_s"]
    result["learner_redone"] = redone
    result["checkpoint"] = {
        "write_s": statistics.median(w["write_s"] for w in writes),
        "read_s": read_s,
        "verify_s": verify_s,
        "bytes": writes[-1]["bytes"],
    }
    return result


def driver_kill(model: str, out: Path) -> dict:
    """A fresh run's time to its first row against a SIGKILLed run's restart (resume=latest) to its first row."""
    troupe = str(Path(sys.executable).with_name("troupe"))
    base = [troupe, *MODELS[model], *COMMON, "run.iterations=4", "run.checkpoint_every=1"]

    def first_row(cmd: list[str], metrics: Path, rows_before: int) -> tuple[subprocess.Popen, float]:
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        while len(_rows(metrics)) <= rows_before:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(cmd)} exited: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)
        return proc, time.perf_counter() - start

    run_dir = out / "driver"
    proc, fresh_s = first_row([*base, f"run.output_dir={run_dir}"], run_dir / "metrics.jsonl", 0)
    marker = run_dir / "checkpoints" / "iter-000000" / "manifest.json"
    while not marker.exists():
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = [r for r in _rows(run_dir / "metrics.jsonl") if r["iteration"] <= 0]
    cmd = [*base, f"run.output_dir={run_dir}", "resume=latest"]
    proc, resumed_s = first_row(cmd, run_dir / "metrics.jsonl", len(kept))
    if proc.wait(timeout=1800) != 0:
        raise RuntimeError(proc.stderr.read().decode()[-2000:])
    return {"fresh_first_row_s": fresh_s, "resumed_first_row_s": resumed_s, "driver_s": resumed_s - fresh_s}


def table(results: dict) -> str:
    lines = [
        "| failure | " + " | ".join(results) + " |",
        "|---|" + "---|" * len(results),
    ]
    rows = [
        ("undisturbed iteration (median)", lambda r: f"{r['iteration_s']:.2f} s"),
        ("generator killed: extra time", lambda r: f"{r['generator_s']:.2f} s"),
        ("reward shard killed: extra time", lambda r: f"{r['reward_s']:.2f} s"),
        (
            "learner rank killed: rebuild + redone",
            lambda r: f"{r['learner_s']:.1f} s ({r['learner_rebuild_s']:.1f} s + {r['learner_redone']} it)",
        ),
        (
            "driver killed: restart (resume=latest) to its first row",
            lambda r: (
                f"{r['resumed_first_row_s']:.1f} s (fresh start: {r['fresh_first_row_s']:.1f} s)"
                if "driver_s" in r
                else "-"
            ),
        ),
        ("checkpoint write (median)", lambda r: f"{r['checkpoint']['write_s']:.2f} s"),
        (
            "checkpoint read (checksums + DeepSpeed load)",
            lambda r: f"{r['checkpoint']['read_s']:.2f} s ({r['checkpoint']['verify_s']:.2f} s checksums)",
        ),
        ("checkpoint size", lambda r: f"{r['checkpoint']['bytes'] / 1e6:.1f} MB"),
    ]
    for name, cell in rows:
        lines.append(f"| {name} | " + " | ".join(cell(r) for r in results.values()) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny", "smollm2"])
    parser.add_argument("--skip-driver", action="store_true", help="skip the SIGKILL + resume=latest runs")
    parser.add_argument("--out", default="outputs/bench-recovery")
    parser.add_argument("--table", action="store_true", help="print the table of the last results.json only")
    parser.add_argument(
        "--smoke", action="store_true", help="the tiny model only (--out: temporary by default)"
    )
    args = parser.parse_args()
    if args.smoke:
        from bench.troupe_run import smoke_out

        args.models = ["tiny"]
        args.out = str(smoke_out(None if args.out == parser.get_default("out") else args.out, "recovery"))
    if args.table:
        print(table(json.loads((Path(args.out) / "results.json").read_text())))
        return 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for model in args.models:
        work = Path(tempfile.mkdtemp(prefix=f"recovery-{model}-", dir=out))
        print(f"{model}: in-process run with kills", flush=True)
        results[model] = in_process(model, work)
        if not args.skip_driver:
            print(f"{model}: driver SIGKILL and resume=latest", flush=True)
            results[model].update(driver_kill(model, work))
        (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n" + table(results))
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
