"""VLLMTurns asks vLLM for deltas only where a turn may be stopped early (partial rollouts), and refuses to stop
turns whose tokens it would not have."""

from types import SimpleNamespace

import pytest

from troupe.actors.generator.sampling import Sampling
from troupe.actors.generator.vllm_turns import VLLMTurns


class RecordingEngine:  # stands in for vLLM's LLMEngine: records what it is asked
    def __init__(self):
        self.added, self.aborted = [], []

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
