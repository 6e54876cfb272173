"""The GPU paths (`pytest -m gpu` on a GPU machine; skipped without CUDA): vLLM sleep mode around a weight load,
ZeRO-3 partitioned loading on CUDA, a colocated run that sleeps its generator through the learn phase and takes its
weights by CUDA IPC, and the NCCL weight sync on vLLM's weight-transfer engine.

One GPU is enough for all but the NCCL test (2 GPUs): actors share it by fractions (Ray), and every engine is given
its share of the memory."""

import json

import pytest
import ray
import torch

from tests.integration.conftest import TINY_OVERRIDES
from tests.integration.test_learner_math import _kl_after_one_update
from troupe.actors.generator.actor import Generator
from troupe.actors.generator.config import GeneratorConfig
from troupe.actors.protocol import WeightBundle

pytestmark = [pytest.mark.integration, pytest.mark.gpu]

SHARE = 0.2  # of the GPU, per engine
PROMPT = list(range(100, 180))  # long enough to fill prefix-cache blocks: a stale cache would be reused
COMPLETION = list(range(200, 216))


def _generator(path: str, sleep_level: int = 0):
    config = GeneratorConfig(
        num_gpus=SHARE,
        dtype="bfloat16",
        max_model_len=512,
        gpu_memory_utilization=SHARE,
        sleep_level=sleep_level,
    )
    handle = ray.remote(num_gpus=SHARE)(Generator).remote(config, path, 0)
    ray.get(handle.ready.remote())
    return handle


def _other_weights(path: str, folder) -> dict[str, torch.Tensor]:
    """The model with every weight moved by half its spread, saved to `folder` too (tokenizer included)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5 * p.std().clamp_min(1e-2))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(path).save_pretrained(folder)
    return dict(model.state_dict())


def _logprobs(handle) -> list[float]:
    return ray.get(handle.sequence_logprobs.remote(PROMPT, COMPLETION))


@pytest.mark.parametrize("level", [1, 2])
def test_a_woken_generator_serves_the_weights_loaded_while_it_slept(
    ray_session, tiny_model_path, tmp_path, level
):
    """Level 1 wakes on its own weights; level 2 refuses to serve until weights load. A load into a sleeping engine
    then serves exactly what an engine built from those weights serves, prefix cache included (TRL #5312)."""
    weights = _other_weights(tiny_model_path, tmp_path)
    slept, fresh = _generator(tiny_model_path, level), _generator(str(tmp_path))
    try:
        before = _logprobs(slept)  # also fills the prefix cache with the old weights' KV
        want = _logprobs(fresh)
        assert max(abs(a - b) for a, b in zip(before, want, strict=True)) > 0.1, "weights must differ to tell"

        assert ray.get(slept.sleep.remote())["freed_gib"] > 0
        assert ray.get(slept.wake.remote()) is (level == 1)
        if level == 1:
            assert _logprobs(slept) == pytest.approx(
                before, abs=1e-4
            )  # its own weights, back from CPU memory
            ray.get(slept.sleep.remote())
        else:
            with pytest.raises(ray.exceptions.RayTaskError, match="sleep_level=2"):
                _logprobs(slept)

        report = ray.get(slept.update_weights.remote(WeightBundle(1, weights)))
        assert report["version"] == 1
        assert _logprobs(slept) == pytest.approx(want, abs=1e-4)
    finally:
        for handle in (slept, fresh):
            ray.kill(handle)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_zero3_partitioned_loading_on_cuda(ray_session, tiny_model_path, dtype):
    """ZeRO-3 with zero.Init on a CUDA rank gives the KL of the ZeRO-2 rank after one update (rotary buffers in
    fp32 on both)."""
    extra = ("learner.num_gpus=1",)
    whole_info, whole = _kl_after_one_update(tiny_model_path, dtype, world=1, zero=2, extra=extra)
    sharded_info, sharded = _kl_after_one_update(tiny_model_path, dtype, world=1, zero=3, extra=extra)
    assert sharded_info[0]["reference_held"] == 1.0 and whole["kl"] > 1e-4
    assert sharded["kl"] == pytest.approx(whole["kl"], rel=2e-2 if dtype == "bfloat16" else 1e-3)


def test_colocated_run_sleeps_its_generator_through_the_learn_phase(ray_session, tmp_path):
    import troupe

    out = tmp_path / "run"
    troupe.train(
        *TINY_OVERRIDES,
        f"run.output_dir={out}",
        "run.iterations=2",
        "placement.layout=colocated",
        "learner.world_size=1",
        "generator.replicas=1",
        "generator.num_gpus=0.4",
        "learner.num_gpus=0.5",
        "generator.sleep_level=1",
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["iteration"] >= 0]
    assert len(train_rows) == 2 and all(r["sleep/freed_gib"] > 0 for r in train_rows), train_rows
    assert all(r["sleep/woke_without_weights"] == 0 for r in train_rows)
    # colocated on a GPU: the weights go by CUDA IPC from the learner rank on the same GPU, every tensor checked
    assert all(r["sync/transport_ipc"] == 1 and r["sync/generators_stale"] == 0 for r in train_rows), (
        train_rows
    )
    assert train_rows[-1]["accounting/lost"] == 0


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="NCCL needs the learner and the generator on different GPUs: 2 GPUs",
)
def test_weights_cross_by_nccl_on_vllms_engine_every_tensor_checked(ray_session, tmp_path):
    import troupe

    out = tmp_path / "run"
    troupe.train(
        *TINY_OVERRIDES,
        f"run.output_dir={out}",
        "run.iterations=2",
        "learner.world_size=1",
        "generator.replicas=1",
        "generator.num_gpus=1",
        "learner.num_gpus=1",
        "generator.gpu_memory_utilization=0.3",
        "sync.transport=nccl",
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["iteration"] >= 0]
    assert all(r["sync/transport_nccl"] == 1 and r["sync/generators_synced"] == 1 for r in train_rows), (
        train_rows
    )
    assert all(r["sync/generators_stale"] == 0 for r in train_rows)
