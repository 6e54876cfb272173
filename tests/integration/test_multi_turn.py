"""Multi-turn trajectories on a real vLLM Generator actor (tiny random model): turns alternate with environment
observations, the recorded ids are the ones the engine sampled from, and environments that hang or raise end
only their own trajectories, counted."""

import json
import textwrap
import time

import pytest
import ray
import torch

from troupe.actors.envs.config import EnvConfig
from troupe.actors.envs.trajectory import OBSERVATION
from troupe.actors.generator.actor import Generator
from troupe.actors.generator.config import GeneratorConfig
from troupe.actors.generator.sampling import Sampling
from troupe.actors.protocol import Prompt

ENVS = """
import time
from troupe.actors.envs.protocol import StepResult

class Hangs:
    '''Its step hangs for prompt q1; for the others, one follow-up turn.'''
    def reset(self, prompt):
        self.hang, self.turns = prompt.uid == "q1", 0
        return prompt.chat()
    def step(self, message):
        self.turns += 1
        if self.hang:
            time.sleep(30)
        if self.turns < 2:
            return StepResult([{"role": "user", "content": "Go on."}], reward=0.5)
        return StepResult(done=True, reward=0.5)

class Raises:
    '''Its reset raises for prompt q1; for the others, one turn.'''
    def reset(self, prompt):
        if prompt.uid == "q1":
            raise RuntimeError("the environment service is down")
        return prompt.chat()
    async def step(self, message):
        return StepResult(done=True, reward=1.0)
"""


@pytest.fixture(scope="module")
def generator(ray_session, tiny_model_path):
    """One tiny vLLM generator for the module, taking weights on its own thread (as in async runs)."""
    remote = ray.remote(concurrency_groups={"weights": 1})(Generator).options(
        num_cpus=0,
        runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}},
    )
    gen = remote.remote(GeneratorConfig(max_model_len=512), tiny_model_path, 7)
    yield gen
    ray.kill(gen)


def _prompts(n, turns=3):
    return [
        Prompt(
            f"q{i}",
            (),
            f"Question {i}?",
            meta=(("turns", json.dumps([f"Question {i}?", "Why?", "Sure?"][:turns])),),
        )
        for i in range(n)
    ]


def test_follow_up_conversations_record_what_the_engine_sampled(generator, tiny_model_path):
    env = EnvConfig(target="troupe.actors.envs.builtin:FollowUpEnv", max_turns=3, max_tokens=200)
    sampling = Sampling(n=2, temperature=1.0, max_new_tokens=12, seed=5)
    trajectories, counts = ray.get(generator.run_trajectories.remote(_prompts(3), sampling, env), timeout=300)
    assert [(t.prompt.uid, t.sample_index) for t in trajectories] == [
        (f"q{i}", s) for i in range(3) for s in (0, 1)
    ]
    assert counts.get("ended/done", 0) + counts.get("ended/max_tokens", 0) == 6
    for t in trajectories:
        assert len(t.ids) == len(t.loss_mask) == len(t.logprobs) == len(t.versions)
        assert all((v == OBSERVATION) == (m == 0) for v, m in zip(t.versions, t.loss_mask, strict=True))
        users = [m["content"] for m in t.messages if m["role"] == "user"]
        assert users == [f"Question {t.prompt.uid[1:]}?", "Why?", "Sure?"][: len(users)]
        if t.end == "done":
            assert t.turns == 3 and users[1:] == ["Why?", "Sure?"]
    # the context the engine sampled each turn from is the recorded one: teacher-forced log-probs of the whole
    # trajectory (at T = 1, as sampled) equal the behaviour log-probs of every generated token
    t = max(trajectories, key=lambda t: t.turns)
    assert t.turns >= 2
    scored = ray.get(generator.sequence_logprobs.remote(t.prompt_ids, t.ids), timeout=120)
    generated = torch.tensor(t.loss_mask).bool()
    assert torch.allclose(torch.tensor(scored)[generated], torch.tensor(t.logprobs)[generated], atol=2e-2)
    # deterministic: the same seed gives the same trajectories
    again, _ = ray.get(generator.run_trajectories.remote(_prompts(3), sampling, env), timeout=300)
    assert [a.ids for a in again] == [t.ids for t in trajectories]


def test_an_env_that_hangs_or_raises_ends_only_its_trajectories(generator, tmp_path):
    (tmp_path / "my_envs.py").write_text(textwrap.dedent(ENVS))
    hangs = EnvConfig(target=f"{tmp_path}/my_envs.py:Hangs", step_timeout_s=2, max_turns=3, workers=4)
    sampling = Sampling(n=2, temperature=1.0, max_new_tokens=8)
    start = time.monotonic()
    trajectories, counts = ray.get(
        generator.run_trajectories.remote(_prompts(2), sampling, hangs), timeout=120
    )
    assert time.monotonic() - start < 60
    assert counts["timeouts"] == counts["ended/timeout"] == 2
    for t in trajectories:
        if t.prompt.uid == "q1":
            assert t.end == "timeout" and "step timed out" in t.error and t.turns == 1
        else:
            assert t.end == "done" and t.turns == 2 and t.turn_rewards == [0.5, 0.5]
    raises = EnvConfig(target=f"{tmp_path}/my_envs.py:Raises", step_timeout_s=5)
    trajectories, counts = ray.get(
        generator.run_trajectories.remote(_prompts(2), sampling, raises), timeout=120
    )
    by_uid = {t.prompt.uid: t for t in trajectories}
    assert by_uid["q1"].end == "error" and "service is down" in by_uid["q1"].error and by_uid["q1"].ids == []
    assert by_uid["q0"].end == "done" and by_uid["q0"].turns == 1 and by_uid["q0"].turn_rewards == [1.0]
    assert counts["errors"] == 2 and counts["ended/error"] == 2


def test_weights_pushed_mid_run_continue_the_turns_in_flight(generator, tiny_model_path):
    """Partial rollouts: a generator that takes weights on its own thread loads them between engine steps while
    a multi-turn generate runs; the turns in flight keep their tokens (old version) and finish on the new one."""
    from transformers import AutoModelForCausalLM

    from troupe.actors.protocol import WeightBundle

    env = EnvConfig(target="troupe.actors.envs.builtin:FollowUpEnv", max_turns=3, max_tokens=400)
    before = ray.get(generator.ready.remote(), timeout=300)["version"]
    weights = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).state_dict()
    bundle = WeightBundle(before + 1, {k: v.clone() for k, v in weights.items()})
    prompts = _prompts(4)
    running = generator.run_trajectories.remote(
        prompts, Sampling(n=2, temperature=1.0, max_new_tokens=120), env
    )
    time.sleep(1.0)
    ready, _ = ray.wait([running], timeout=0)
    assert not ready, "generation finished before the push: the test needs it in flight"
    report = ray.get(
        generator.update_weights.options(concurrency_group="weights").remote(bundle), timeout=120
    )
    trajectories, counts = ray.get(running, timeout=300)
    assert report["version"] == before + 1 and counts["weight_syncs"] == 1 and counts["partial_turns"] >= 1
    spans = [[v for v, m in zip(t.versions, t.loss_mask, strict=True) if m] for t in trajectories]
    assert any(before in s and before + 1 in s for s in spans), spans  # some turn straddled the sync
    assert all(s == sorted(s) for s in spans)  # old tokens first, then new ones
    later, _ = ray.get(generator.run_trajectories.remote(prompts[:1], Sampling(n=1, max_new_tokens=8), env))
    assert {v for v in later[0].versions if v >= 0} == {before + 1}
