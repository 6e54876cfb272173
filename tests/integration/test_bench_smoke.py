"""Every benchmark's `--smoke` mode, as a subprocess from the repo root: the tiny model, one or two steps, outputs in
a temporary folder. Each must exit 0 and report the fields its full run reports (a renamed metric fails here).

A benchmark is every bench/*.py with a `__main__` block; one without a smoke mode or without a check below fails.
The smoke runs are heavy (Ray, vLLM, DeepSpeed): run this file alone, under the machine's heavy-job lock:
    flock /tmp/heavy.lock .venv/bin/python -m pytest -q tests/integration/test_bench_smoke.py --durations=0
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
ENTRY_POINTS = sorted(
    p.stem for p in BENCH.glob("*.py") if 'if __name__ == "__main__"' in p.read_text(encoding="utf-8")
)
NEEDS_DATA = {"reward_models", "real_data"}
TIMEOUT_S = 900


def smoke(name: str, out: Path, *args: str) -> str:
    """`python -m bench.<name> --smoke --out <out> ...`; its stdout, after asserting it exited 0."""
    cmd = [sys.executable, "-m", f"bench.{name}", "--smoke", "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n"
        f"{proc.stderr[-6000:]}"
    )
    return proc.stdout


def has(d: dict, *keys: str) -> None:
    missing = [k for k in keys if k not in d]
    assert not missing, f"missing {missing}; has {sorted(d)}"


def printed(stdout: str, *texts: str) -> None:
    missing = [t for t in texts if t not in stdout]
    assert not missing, f"not printed: {missing}\n{stdout[-3000:]}"


def need_data() -> None:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent: this benchmark reads the shared public datasets")


# ------------------------------------------------------------------------------------------------------ the checks


def check_generator_dtype(out: Path, _) -> None:
    stdout = smoke("generator_dtype", out)
    r = json.loads((out / "results.json").read_text())
    has(r, "model", "native_bf16", "tok_s", "vs_fp32", "auto")
    has(r["tok_s"], "float32", "bfloat16")
    assert all(v > 0 for v in r["tok_s"].values()), r
    printed(stdout, "tok/s", "vs fp32", "auto resolves to:")


def check_learning_check(out: Path, _) -> None:
    stdout = smoke("learning_check", out)
    r = json.loads((out / "results.json").read_text())
    has(r["scores"], "base", "grpo")
    for s in r["scores"].values():
        has(s, "accuracy", "reward")
    ckpt, wall, info = r["runs"]["grpo"]
    has(info, "train_reward_first", "train_reward_last", "samples")
    assert Path(ckpt).is_dir() and info["samples"] > 0, r["runs"]
    printed(stdout, "acc before", "acc after", "reward before", "reward after")


def check_async(out: Path, _) -> None:
    stdout = smoke("async", out)
    r = json.loads((out / "results.json").read_text())
    has(r, "sync", "async", "speedup")
    for mode in ("sync", "async"):
        has(r[mode], "wall_s", "iterations", "steady_s", "samples_per_s", "generate_s", "score_s", "learn_s")
        has(r[mode], "sync_s", "reward_last3", "accounting_lost", "staleness", "tis_weight_mean")
        assert r[mode]["iterations"] == 2, r[mode]
    printed(stdout, "| mode | steady s | samples/s", "async / sync throughput:")


def check_scale(out: Path, _) -> None:
    stdout = smoke("scale", out)
    r = json.loads((out / "results.json").read_text())
    has(r, "model", "sync_1", "sync_2", "add_generator_s", "add_generator_refit_s", "reload_s", "dtype")
    for n in (1, 2):
        sync = r[f"sync_{n}"]
        has(sync, "total_s", "export_s", "fetch_verify_s", "load_s", "bytes", "buckets", "vs_in_process")
    assert r["new_member_version_ok"] is True, r
    printed(
        stdout, "in-process reload (baseline)", "| generators | sync total |", "add a generator until serving"
    )


def check_recovery(out: Path, _) -> None:
    stdout = smoke("recovery", out)
    r = json.loads((out / "results.json").read_text())["tiny"]
    has(r, "iteration_s", "wall_s", "killed", "generator_s", "reward_s", "learner_s", "learner_rebuild_s")
    has(r, "learner_redone", "checkpoint", "fresh_first_row_s", "resumed_first_row_s", "driver_s")
    has(r["killed"], "generator", "reward", "learner")
    has(r["checkpoint"], "write_s", "read_s", "verify_s", "bytes")
    printed(stdout, "generator killed: extra time", "driver killed: restart", "checkpoint size")


def check_learn_phase(out: Path, _) -> None:
    stdout = smoke("learn_phase", out)
    r = json.loads((out / "learn_phase.json").read_text())
    has(r, "model", "dtype", "peak_tflops_2_threads", "layouts")
    assert [row["layout"] for row in r["layouts"]] == ["1x2", "2x1", "1x2+compile"], r["layouts"]
    assert [max(s["compiled_graphs"] for s in row["steps"]) > 0 for row in r["layouts"]] == [
        False,
        False,
        True,
    ]
    for row in r["layouts"]:
        has(row, "ranks", "threads", "steps", "median_s", "tflops", "roofline_fraction", "shape")
        has(row["tflops"], "done", "vs_trl_count")
        assert len(row["steps"]) == 2 and row["median_s"] > 0 and sum(row["shape"]["response_tokens"]) > 0, (
            row
        )
    printed(stdout, "TFLOP/s done", "speed vs 1x2")


RM_MODELS = (
    "BT (linear probe, frozen)",
    "ArmoRM (gating)",
    "ALaRM (holistic ArmoRM + aspects)",
    "ALaRM (holistic BT probe + aspects)",
    "BT (fine-tuned, 8 pairs)",
    "HaF-RM (fine-tuned, 8 pairs)",
)


def check_reward_models(out: Path, rm: dict) -> None:
    need_data()
    stdout, folder = rm["run"]()
    r = json.loads((folder / "results.json").read_text())
    has(r, "results", "dropped", "stage1", "stage2", "consistency")
    has(r["results"], *RM_MODELS)
    for rep in r["results"].values():
        has(rep, "accuracy", "subsets")
        has(rep["subsets"], "hh-harmless", "pandalm")
    has(r["stage2"], "debias", "bt_loss_first_last")
    assert (folder / "stage2" / "bundle.json").is_file()
    printed(stdout, "pairwise accuracy on held-out pairs", "ALaRM aspects' agreement", "Spearman correlation")


def check_real_data(out: Path, rm: dict) -> None:
    need_data()
    # The chat part is scored by the reward-model smoke's bundle: one RM run serves both checks.
    _, rm_folder = rm["run"]()
    stdout = smoke("real_data", out, "--bundle", str(rm_folder / "stage2"))
    r = json.loads((out / "results.json").read_text())
    has(r, "gsm8k", "chat")
    for part, headline in (("gsm8k", "accuracy"), ("chat", "objective/armo")):
        seed = r[part]["seeds"]["0"]
        has(seed, "before", "after", "samples", "skipped", "wall_s")
        for row in (seed["before"], seed["after"]):
            has(row, headline, "reward/mean", "reward/length_corr", "response_tokens/mean", "truncated/frac")
    printed(stdout, "| gsm8k (greedy, held-out) | before | after |", "| chat (greedy, held-out) |")


def check_vs_trl(out: Path, _) -> None:
    stdout = smoke("vs_trl", out)
    r = json.loads((out / "vs_trl.json").read_text())
    has(
        r, "spec", "machine", "matmul_peak_tflops_2_threads", "matmul_params", "results", "summary", "skipped"
    )
    for s in r["summary"].values():
        has(s, "median_step_s", "completions_per_s", "generated_tokens_per_s", "tokens_per_completion")
        has(s, "median_phase_s", "learn_tflops", "learn_peak_fraction", "reward_mean_first_last")
        has(s["median_phase_s"], "generate", "score", "learn", "sync")
    printed(stdout, "completions/s", "generated tok/s (whole step)", "learn TFLOP/s (est.)")
    # TRL installed in .bench-trl/: both halves ran, with the prompt check inside TRL's run.
    if "trl" in r["results"]:
        has(r, "ratio_troupe_over_trl_completions_per_s")
        printed(stdout, "troupe / TRL completions/s:")
    else:  # without TRL: troupe's half and the prompt-id check against a tokenizer-level rendering
        assert r["skipped"] and r["prompt_rendering_check"]["steps_checked"] == 2, r["skipped"]
        printed(stdout, "bench/vs_trl: smoke: skipped the TRL half")


def check_rm_serve(out: Path, _) -> None:
    stdout = smoke("rm_serve", out)
    r = json.loads((out / "results.json").read_text())
    has(r, "levels", "batches", "items_per_request")
    has(r["levels"], "1", "8")
    for row in r["levels"].values():
        has(row, "troupe", "one_lock", "ratio_requests_per_s")
        for side in ("troupe", "one_lock"):
            has(row[side], "requests_per_s", "p50_ms", "p99_ms", "requests")
            assert row[side]["requests"] > 0 and row[side]["p99_ms"] >= row[side]["p50_ms"] > 0, row
    assert r["batches"]["requests"] >= r["batches"]["batches"] > 0, r["batches"]
    printed(stdout, "| clients | troupe req/s |", "fleet batches:")


def check_judge(out: Path, _) -> None:
    stdout = smoke("judge", out)
    r = json.loads((out / "results.json").read_text())
    has(r, "model", "samples", "standalone_samples_per_s", "replicas_1")
    has(r["replicas_1"], "samples_per_s", "samples_per_s_per_replica", "vs_standalone", "invalid")
    assert r["replicas_1"]["samples_per_s"] > 0, r
    printed(stdout, "| replicas | judged samples/s |", "standalone vLLM")


def check_hierarchy(out: Path, _) -> None:
    stdout = smoke("hierarchy", out)
    r = json.loads((out / "results.json").read_text())
    has(r["variants"], "selection")
    for variant in r["variants"].values():
        has(variant, "runs", "before", "after")
        has(variant["after"], "accuracy", "objective/format", "objective/length", "objective/repetition")
    assert r["variants"]["selection"]["runs"][0]["selected"], r["variants"]["selection"]["runs"]
    printed(stdout, "| reward | accuracy |", "before -> after")


def check_trajectories(out: Path, _) -> None:
    stdout = smoke("trajectories", out)
    r = json.loads((out / "results.json").read_text())
    has(r["results"], "1x2 continuous", "1x2 lockstep", "2x1 continuous")
    for layout in r["results"].values():
        has(layout, "trajectories", "tokens", "traj_s", "tok_s", "wall_s")
        assert layout["trajectories"] == 8 and layout["tokens"] > 0, r  # 4 prompts x 2, every one finished
    printed(stdout, "traj/s", "vs 1x2 continuous", "environment latency")


def check_gpu_check(out: Path, _) -> None:
    stdout = smoke("gpu_check", out)
    r = json.loads((out / "results.json").read_text())
    has(r, "device", "peak_tflops", "split", "colocated", "standalone")
    for placement in ("split", "colocated"):
        run = r[placement]
        has(run, "gen_tok_s", "sync_s", "learn_s", "mfu", "iteration_s", "sleep_freed_gib")
        assert run["iterations"] == 2 and run["gen_tok_s"] > 0 and run["sync_s"] > 0 and run["mfu"] > 0, run
    assert "placement.layout=colocated" in r["colocated"]["overrides"], r["colocated"]
    assert r["standalone"]["gen_tok_s"] > 0 and r["standalone"]["reload_s"] > 0, r["standalone"]
    assert r["split"]["transport"] == r["colocated"]["transport"] == "object_store", (
        r
    )  # CPU: no GPU transport
    printed(stdout, "vs vLLM", "vs reload", "MFU", "colocated / split", "weights by:")


def check_zero3_memory(out: Path, _) -> None:
    stdout = smoke("zero3_memory", out)
    r = json.loads((out / "results.json").read_text())
    has(r, "params", "dtype", "world_size", "variants")
    before, after = r["variants"]["before (zero_init=false)"], r["variants"]["after (zero_init=true)"]
    for variant in (before, after):
        assert len(variant["ranks"]) == 2 and all(
            0 < rank["load_peak_rss_mb"] <= rank["peak_rss_mb"] for rank in variant["ranks"]
        ), variant
        assert all(0.4 < rank["held"] < 0.6 for rank in variant["ranks"]), variant  # ZeRO-3 either way
    # the reference: whole on every rank before, half of it on each rank after
    assert [rank["reference_held"] for rank in before["ranks"]] == [1.0, 1.0]
    assert all(0.4 < rank["reference_held"] < 0.6 for rank in after["ranks"]), after
    printed(stdout, "peak MiB, loaded", "after / before peak per rank")


CHECKS = {
    "async": check_async,
    "hierarchy": check_hierarchy,
    "judge": check_judge,
    "rm_serve": check_rm_serve,
    "generator_dtype": check_generator_dtype,
    "gpu_check": check_gpu_check,
    "learn_phase": check_learn_phase,
    "learning_check": check_learning_check,
    "real_data": check_real_data,
    "recovery": check_recovery,
    "reward_models": check_reward_models,
    "scale": check_scale,
    "trajectories": check_trajectories,
    "vs_trl": check_vs_trl,
    "zero3_memory": check_zero3_memory,
}


# ------------------------------------------------------------------------------------------------------- the tests


def test_every_benchmark_has_a_smoke_mode_and_a_check():
    assert ENTRY_POINTS, f"no benchmark found in {BENCH}"
    no_flag = [n for n in ENTRY_POINTS if '"--smoke"' not in (BENCH / f"{n}.py").read_text(encoding="utf-8")]
    assert not no_flag, f"benchmarks without a --smoke mode: {no_flag}"
    unchecked = sorted(set(ENTRY_POINTS) - set(CHECKS))
    assert not unchecked, f"benchmarks with no smoke check in {Path(__file__).name}: {unchecked}"
    gone = sorted(set(CHECKS) - set(ENTRY_POINTS))
    assert not gone, f"checks for benchmarks that are no longer entry points: {gone}"


@pytest.fixture(scope="module")
def rm(tmp_path_factory):
    """The reward-model smoke, run once on demand: its own check and the real-data chat part both use it."""
    done: dict = {}

    def run():
        if "out" not in done:
            folder = tmp_path_factory.mktemp("reward_models")
            done["out"] = (smoke("reward_models", folder), folder)
        return done["out"]

    return {"run": run}


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_bench_smoke(name, tmp_path, rm):
    if name not in CHECKS:
        pytest.fail(f"bench/{name}.py is a benchmark with no smoke check in {Path(__file__).name}")
    if name in NEEDS_DATA:
        need_data()
    CHECKS[name](tmp_path / name, rm)
