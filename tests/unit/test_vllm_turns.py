"""VLLMTurns asks vLLM for deltas only where a turn may be stopped early (partial rollouts), and refuses to stop
turns whose tokens it would not have."""

from types import SimpleNamespace

import pytest

from troupe.actors.generator.sampling import Sampling
from troupe.actors.generator.vllm_turns import VLLMTurns

pytest.importorskip("vllm", reason="VLLMTurns drives vLLM's engine (the [cpu] or [gpu] extra)")


class RecordingEngine:  # stands in for vLLM's LLMEngine: records what it is asked, returns scripted outputs
    def __init__(self, outputs=()):
        self.added, self.aborted, self.outputs = [], [], list(outputs)

    def step(self):
        return self.outputs

    def add_request(self, request_id, prompt, params):
        self.added.append(params)

    def abort_request(self, request_ids):
        self.aborted.extend(request_ids)


@pytest.mark.parametrize("deltas", [True, False])
def test_outputs_are_deltas_only_with_partial_rollouts(deltas):
    from vllm.sampling_params import RequestOutputKind

    engine = RecordingEngine()
    turns = VLLMTurns(SimpleNamespace(llm_engine=engine), Sampling(n=2, temperature=0.7), deltas=deltas)
    turns.submit(5, [1, 2, 3], max_tokens=8, seed=None)
    expected = RequestOutputKind.DELTA if deltas else RequestOutputKind.FINAL_ONLY
    assert engine.added[0].output_kind == expected and engine.added[0].n == 1
    if deltas:
        assert turns.abort() == [5] and len(engine.aborted) == 1
    else:
        with pytest.raises(RuntimeError, match="deltas=True"):
            turns.abort()
        assert engine.aborted == []


def test_a_finished_turn_becomes_one_output_with_every_token_and_its_log_prob():
    engine = RecordingEngine()
    turns = VLLMTurns(SimpleNamespace(llm_engine=engine), Sampling(temperature=0.7), deltas=False)
    turns.submit(3, [1, 2], max_tokens=4, seed=None)
    request_id = next(iter(turns._key_of))
    logprobs = [{7: SimpleNamespace(logprob=-0.5)}, {9: SimpleNamespace(logprob=-1.25)}]
    completion = SimpleNamespace(token_ids=[7, 9], logprobs=logprobs, text="ab", finish_reason="length")
    engine.outputs = [SimpleNamespace(request_id=request_id, finished=True, outputs=[completion])]
    (out,) = turns.step()
    assert (out.key, out.token_ids, out.logprobs, out.text) == (3, [7, 9], [-0.5, -1.25], "ab")
    assert out.finished and out.finish_reason == "length" and turns._key_of == {}  # the request is forgotten
