"""The `troupe` console script end to end on a user's prompt files with Hydra overrides (in run.mode=async):
metrics JSONL with eval rows and skipped-row counts, a quiet console, TensorBoard files, `troupe plot`, and a
checkpoint that loads with transformers and with vLLM."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from tests.integration.conftest import TINY_OVERRIDES

pytestmark = pytest.mark.integration


TROUPE = Path(sys.executable).with_name("troupe")


def write_prompt_files(folder: Path) -> tuple[Path, Path]:
    rows = [
        {"question": f"Ava has {i} apples and gets {i + 1} more. How many now?", "answer": str(2 * i + 1)}
        for i in range(6)
    ]
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, '{"question": "broken')  # line 3: malformed JSON, skipped and counted
    lines.append(json.dumps({"question": "word " * 600, "answer": "1"}))  # over data.max_prompt_tokens
    train = folder / "train.jsonl"
    train.write_text("\n".join(lines) + "\n")
    held_out = folder / "eval.jsonl"
    held_out.write_text(
        "".join(
            json.dumps({"question": f"Ben has {i} pens and buys 2 more. How many?", "answer": str(i + 2)})
            + "\n"
            for i in range(4)
        )
    )
    return train, held_out


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    out = folder / "run"
    train, held_out = write_prompt_files(folder)
    cmd = [
        str(TROUPE),
        *TINY_OVERRIDES,
        "run.iterations=2",
        "algo=rloo",
        f"run.output_dir={out}",
        "run.progress_bar=false",
        f"data.train={train}",
        f"data.eval={held_out}",
        "data.prompt_key=question",
        "data.answer_key=answer",
        "data.max_prompt_tokens=256",
        "eval.every=2",
        "run.mode=async",  # the second batch is sampled while the first trains
        "run.max_staleness=1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, proc.stderr


def test_cli_trains_on_a_prompt_file_counts_bad_rows_and_evaluates(cli_run):
    out, stdout, _ = cli_run
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [-1, 0, 1]  # the evaluation before training, then 2 iterations
    assert [x["weight_version"] for x in lines] == [0, 1, 2]
    init, first, last = lines
    for row in (
        init,
        last,
    ):  # eval.every=2: before training and after the last iteration, not after the first
        assert 0.0 <= row["eval/greedy/accuracy"] <= 1.0 and "eval/greedy/reward/mean" in row
        assert row["eval/greedy/response_tokens/mean"] > 0
    assert not any(k.startswith("eval/") for k in first)
    assert first["staleness/max"] == 0 and last["staleness/max"] == 1  # async: one version behind
    assert last["accounting/lost"] == 0 and last["accounting/trained"] == 8
    for row in (first, last):
        assert row["data/skipped/malformed_json"] == 1 and row["data/skipped/too_long"] == 1
        assert row["data/prompts"] == 6 and row["data/rows"] == 8
    lines = lines[1:]
    assert all(x["algo"] == "rloo" for x in lines)  # the algorithm is one Hydra override
    assert "\ninit " in stdout and "eval acc" in stdout  # the table shows the evaluation rows
    for x in lines:
        assert {
            "reward/mean",
            "objective/correctness",
            "train/loss",
            "train/kl",
            "time/generate",
            "time/learn",
        } <= set(x)
    assert "checkpoint:" in stdout and "reward" in stdout  # the table and the paths are printed


def test_console_shows_only_troupe_lines_and_logs_go_to_files(cli_run):
    out, stdout, stderr = cli_run
    console = stdout + stderr
    for noise in ("INFO", "vLLM", "DeepSpeed", "Failed to load weights", "(Generator pid="):
        assert noise not in console, f"{noise!r} on the console:\n{console[-2000:]}"
    stray = [line for line in stderr.splitlines() if line.strip() and not line.startswith("troupe")]
    assert not stray, f"lines on the console that are not troupe's: {stray[:5]}"
    assert "train.jsonl:3" in console  # the malformed row's warning names file:line
    driver_log = (out / "logs" / "driver.log").read_text()
    assert driver_log.strip()
    ray_logs = out / "logs" / "ray"
    assert ray_logs.is_dir() and any(ray_logs.glob("worker-*.err")), "actors' logs are linked under logs/ray"


def test_tensorboard_files_read_back_with_tensorboards_reader(cli_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(cli_run[0] / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"reward/mean", "objective/correctness", "eval/greedy/accuracy", "time/learn"} <= tags
    assert [e.step for e in acc.Scalars("reward/mean")] == [1, 2]
    assert [e.step for e in acc.Scalars("eval/greedy/accuracy")] == [0, 2]
    rows = [json.loads(x) for x in (cli_run[0] / "metrics.jsonl").read_text().splitlines()]
    assert acc.Scalars("reward/mean")[1].value == pytest.approx(rows[2]["reward/mean"], rel=1e-5)


def test_troupe_plot_writes_non_empty_pngs(cli_run):
    proc = subprocess.run([str(TROUPE), "plot", str(cli_run[0])], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = [Path(line) for line in proc.stdout.split()]
    names = {p.name for p in written}
    assert {"reward.png", "eval.png", "length_reward.png", "timings.png"} <= names
    for path in written:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, path
    bad = subprocess.run([str(TROUPE), "plot", str(cli_run[0] / "nope")], capture_output=True, text=True)
    assert bad.returncode != 0 and "metrics.jsonl not found" in bad.stderr


def test_checkpoint_loads_with_transformers(cli_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = cli_run[0] / "checkpoint-final"
    assert (ckpt / "model.safetensors").exists()
    state = json.loads((ckpt / "troupe_state.json").read_text())
    assert state["weight_version"] == 2
    # the data cursor: two batches served from the file, with what the order depends on
    assert state["data"]["batches"] == 2 and state["data"]["source"].endswith("train.jsonl")
    assert {"epoch", "position", "uids_sha256", "seed"} <= set(state["data"])
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok("Ava has 3 apples.", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


def test_checkpoint_loads_with_vllm_in_a_generator(cli_run, ray_session, tiny_prompts):
    """The trained checkpoint serves from a real vLLM Generator actor."""
    from troupe.actors.generator.actor import Generator
    from troupe.actors.generator.config import GeneratorConfig
    from troupe.actors.generator.sampling import Sampling

    ckpt = str(cli_run[0] / "checkpoint-final")
    remote = ray.remote(Generator).options(
        num_cpus=0,
        runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}},
    )
    gen = remote.remote(GeneratorConfig(max_model_len=512), ckpt, 7)
    try:
        prompt = tiny_prompts.batch(0).prompts[0]
        rollouts = ray.get(gen.generate.remote([prompt], Sampling(n=2, max_new_tokens=8)), timeout=300)
        assert len(rollouts) == 2 and all(len(r.response_ids) > 0 for r in rollouts)
    finally:
        ray.kill(gen)
