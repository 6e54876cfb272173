"""The `troupe` console script end to end with Hydra overrides: metrics JSONL, and a checkpoint that loads
with transformers and with vLLM."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from tests.integration.conftest import TINY_OVERRIDES

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    troupe = Path(sys.executable).with_name("troupe")
    cmd = [
        str(troupe),
        *TINY_OVERRIDES,
        "run.iterations=2",
        "algo=rloo",
        f"run.output_dir={out}",
        "run.progress_bar=false",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_cli_runs_two_iterations_and_writes_metrics(cli_run):
    out, stdout = cli_run
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [0, 1]
    assert [x["weight_version"] for x in lines] == [1, 2]
    assert all(x["algo"] == "rloo" for x in lines)  # the algorithm is one Hydra override
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


def test_checkpoint_loads_with_transformers(cli_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = cli_run[0] / "checkpoint-final"
    assert (ckpt / "model.safetensors").exists()
    state = json.loads((ckpt / "troupe_state.json").read_text())
    assert state["weight_version"] == 2
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok("Ava has 3 apples.", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


def test_checkpoint_loads_with_vllm_in_a_generator(cli_run, ray_session, tiny_prompts):
    """The trained checkpoint serves from a real vLLM Generator actor."""
    from actors.generator.actor import Generator
    from actors.generator.config import GeneratorConfig
    from actors.generator.sampling import Sampling

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
