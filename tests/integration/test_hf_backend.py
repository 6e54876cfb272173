"""The transformers generator backend: same interface as vLLM, real weights update."""

import pytest
import ray
import torch

from troupe.actors.generator.actor import Generator
from troupe.actors.generator.config import GeneratorConfig
from troupe.actors.generator.sampling import Sampling
from troupe.actors.protocol import WeightBundle

pytestmark = pytest.mark.integration


def test_hf_generator_samples_with_logprobs_and_takes_weights(ray_session, tiny_model_path, tiny_prompts):
    remote = ray.remote(Generator).options(num_cpus=0)
    gen = remote.remote(GeneratorConfig(backend="hf", dtype="float32"), tiny_model_path, 0)
    try:
        prompts = tiny_prompts.batch(5).prompts[:2]
        rollouts = ray.get(gen.generate.remote(prompts, Sampling(n=3, max_new_tokens=8)), timeout=120)
        assert len(rollouts) == 6
        assert [r.prompt.uid for r in rollouts] == [prompts[0].uid] * 3 + [prompts[1].uid] * 3
        for r in rollouts:
            assert r.logprobs.shape == (len(r.response_ids),) and (r.logprobs <= 0).all()
        # Logprobs reported while sampling equal a teacher-forced pass over the same tokens.
        r = rollouts[0]
        forced = ray.get(gen.sequence_logprobs.remote(r.prompt.token_ids, r.response_ids), timeout=60)
        assert torch.allclose(torch.tensor(forced), r.logprobs, atol=1e-4)
        before = forced
        from safetensors.torch import load_file

        tensors = load_file(f"{tiny_model_path}/model.safetensors")
        tensors = {k: torch.zeros_like(v) if "mlp" in k else v for k, v in tensors.items()}
        assert ray.get(gen.update_weights.remote(WeightBundle(1, tensors)), timeout=60)["version"] == 1
        after = ray.get(gen.sequence_logprobs.remote(r.prompt.token_ids, r.response_ids), timeout=60)
        assert max(abs(a - b) for a, b in zip(before, after, strict=True)) > 1e-3
    finally:
        ray.kill(gen)
