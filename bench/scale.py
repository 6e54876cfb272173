"""Scale benchmark: what a weight sync and a new generator cost, against an in-process reload measured in the same
run (SmolLM2-135M by default; real Ray, vLLM, DeepSpeed).

1. troupe sync with 1 and 2 generators: the learners export (gather, pack into checksummed buckets, put in the
   object store) and every generator fetches, checks and loads them, as the driver waits for it
   (`LearnerGroup.export_weights` + `push_weights`).
   Each is measured after one warm-up sync (the first put fills fresh object-store pages); medians of --repeats.
2. Adding a generator: `Pool.resize(n + 1)` until the new member is ready and holds the current weights.
3. The baseline: a `Generator` in this process loads a state dict already in its memory (vLLM's reload_weights
   and the prefix-cache reset), what a trainer that shares the engine's process pays.
Run: .venv/bin/python -m bench.scale [--model smollm2|tiny] [--repeats 5]
Smoke: .venv/bin/python -m bench.scale --smoke [--out FOLDER]: the tiny model, 1 repeat after the warm-up,
results.json under FOLDER (temporary by default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

MODELS = {
    "tiny": ["model.policy=builtin:tiny-llama", "generator.max_model_len=512"],
    "smollm2": ["model.policy=builtin:smollm2-135m-instruct"],
}
COMMON = [
    "ray.num_cpus=2",
    "generator.num_cpus=0.25",
    "learner.world_size=2",  # the export gathers across ranks
    "learner.omp_threads=1",
    "learner.zero_stage=2",
    "run.progress_bar=false",
    "run.print_table=false",
]


def _config(model: str, out: Path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from troupe.cluster.config.compose import CONF_DIR
    from troupe.cluster.config.schema import register

    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return OmegaConf.to_object(
            compose(config_name="config", overrides=[*MODELS[model], *COMMON, f"run.output_dir={out}"])
        )


def through_ray(model: str, repeats: int) -> dict:
    import ray

    from troupe.actors.models import resolve_model
    from troupe.cluster.run.driver import build_fleet
    from troupe.cluster.run.runtime import start_ray
    from troupe.cluster.sync.object_store import push_weights

    out = Path(tempfile.mkdtemp(prefix="troupe-scale-"))
    cfg = _config(model, out)
    model_path = resolve_model(cfg.model.policy)
    start_ray(cfg.ray)
    run = build_fleet(cfg, model_path)
    result: dict = {}
    try:
        for generators in (1, 2):
            if len(run.generators.live()) != generators:
                start = time.perf_counter()
                run.generators.resize(generators)
                result["add_generator_s"] = time.perf_counter() - start
            totals, exports, loads, fetches = [], [], [], []
            for k in range(repeats + 1):  # the first is a warm-up (fresh object-store pages), not counted
                run.version += 1
                start = time.perf_counter()
                run.last_bundle = run.learners.export_weights(run.version, run.sync_bucket_mb)
                exported = time.perf_counter()
                stats = push_weights(run.generators, run.last_bundle, deadline_s=600)
                totals.append(time.perf_counter() - start)
                exports.append(exported - start)
                loads.append(stats["generator_load_s"])
                fetches.append(stats["generator_fetch_s"])
                assert stats["generators_synced"] == generators, stats
                if k == 0:
                    totals, exports, loads, fetches = [], [], [], []
            result[f"sync_{generators}"] = {
                "total_s": statistics.median(totals),
                "export_s": statistics.median(exports),
                "fetch_verify_s": statistics.median(fetches),
                "load_s": statistics.median(loads),
                "bytes": stats["bytes"],
                "buckets": stats["buckets"],
            }
        # A second new member, with an iteration's weights already out: engine start + refit.
        start = time.perf_counter()
        run.generators.resize(3)
        result["add_generator_refit_s"] = time.perf_counter() - start
        new = max(run.generators.members, key=lambda m: m.index)
        result["new_member_version_ok"] = ray.get(new.handle.get_stats.remote())["version"] == run.version
    finally:
        run.shutdown()
        ray.shutdown()
    return result


def in_process(model: str, repeats: int) -> dict:
    """The baseline: reload from tensors already in this process's memory."""
    from safetensors.torch import load_file

    from troupe.actors.generator.actor import Generator
    from troupe.actors.models import resolve_model
    from troupe.actors.protocol import WeightBundle
    from troupe.cluster.run.runtime import generator_env

    cfg = _config(model, Path(tempfile.mkdtemp(prefix="troupe-scale-")))
    os.environ.update(generator_env(cfg.generator))
    model_path = resolve_model(cfg.model.policy)
    gen = Generator(cfg.generator, model_path)
    dtype = __import__("torch").bfloat16 if gen.dtype == "bfloat16" else __import__("torch").float32
    files = sorted(Path(model_path).glob("*.safetensors"))
    tensors = {k: v.to(dtype) for f in files for k, v in load_file(f).items()}
    times = []
    for v in range(repeats + 1):  # the first is a warm-up, as for the syncs
        start = time.perf_counter()
        gen.update_weights(WeightBundle(v + 1, tensors))
        times.append(time.perf_counter() - start)
    times = times[1:]
    return {"reload_s": statistics.median(times), "dtype": gen.dtype}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="bench/results/scale.json")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 1 repeat (--out: a folder)")
    args = parser.parse_args()
    if args.smoke:
        from bench.troupe_run import smoke_out

        folder = smoke_out(None if args.out == parser.get_default("out") else args.out, "scale")
        args.model, args.repeats, args.out = "tiny", 1, str(folder / "results.json")
    result = {
        "model": args.model,
        **through_ray(args.model, args.repeats),
        **in_process(args.model, args.repeats),
    }
    for n in (1, 2):
        result[f"sync_{n}"]["vs_in_process"] = result[f"sync_{n}"]["total_s"] / result["reload_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        f"model {args.model}, {result['sync_1']['bytes'] / 1e6:.0f} MB in {result['sync_1']['buckets']} buckets"
    )
    print(f"in-process reload (baseline): {result['reload_s']:.3f} s")
    print("| generators | sync total | x in-process | export (learner) | fetch + checksum | engine load |")
    print("|---|---|---|---|---|---|")
    for n in (1, 2):
        s = result[f"sync_{n}"]
        print(
            f"| {n} | {s['total_s']:.3f} s | {s['vs_in_process']:.2f} | {s['export_s']:.3f} s | "
            f"{s['fetch_verify_s']:.3f} s | {s['load_s']:.3f} s |"
        )
    print(
        f"add a generator until serving (start + refit): {result['add_generator_s']:.1f} s, "
        f"again later: {result['add_generator_refit_s']:.1f} s (holds the current version: "
        f"{result['new_member_version_ok']})"
    )
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
