"""Assistant turns on vLLM's engine loop (`LLMEngine.add_request` / `step`), for multi-turn trajectories.

`LLM.generate` runs a batch to completion; a trajectory's next turn can only start once its environment has
answered, so the runner (actors/envs/runner.py) drives the engine a step at a time instead, adding turns as they
become ready: continuous batching across trajectories and turns. (vLLM's AsyncLLM would do the same but needs
the engine in its own process; troupe runs it in-process.) With partial rollouts, outputs come as deltas, so a
turn stopped early (a weight sync) keeps the tokens and log-probs it had; otherwise each turn comes back once,
finished, which spares the per-step Python work of a delta for every request at every engine step.
"""

from __future__ import annotations

import itertools

from troupe.actors.envs.runner import TurnOutput
from troupe.actors.generator.sampling import Sampling

REQUEST_IDS = itertools.count()  # unique per process: an aborted request's id is never reused


class VLLMTurns:
    def __init__(self, llm, sampling: Sampling, deltas: bool = True):
        self.engine = llm.llm_engine
        self.sampling = sampling
        self.deltas = deltas  # needed by abort(): a turn stopped early keeps only the tokens delivered so far
        self._key_of: dict[str, int] = {}  # request id -> trajectory

    def submit(self, key: int, ids: list[int], max_tokens: int, seed: int | None) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            n=1,
            temperature=self.sampling.temperature,
            top_p=self.sampling.top_p,
            max_tokens=max_tokens,
            logprobs=0,  # the sampled token's log-prob, of the processed distribution (see vllm_backend.py)
            seed=seed,
            output_kind=RequestOutputKind.DELTA if self.deltas else RequestOutputKind.FINAL_ONLY,
        )
        request_id = f"turn-{next(REQUEST_IDS)}"
        self.engine.add_request(request_id, TokensPrompt(prompt_token_ids=list(ids)), params)
        self._key_of[request_id] = key

    def step(self) -> list[TurnOutput]:
        outputs = []
        for out in self.engine.step():
            c = out.outputs[0]
            key = self._key_of.pop(out.request_id) if out.finished else self._key_of[out.request_id]
            logprobs = [
                float(step[tok].logprob) for tok, step in zip(c.token_ids, c.logprobs or [], strict=True)
            ]
            reason = "length" if c.finish_reason == "length" else "stop"
            outputs.append(TurnOutput(key, list(c.token_ids), logprobs, c.text, out.finished, reason))
        return outputs

    def busy(self) -> bool:
        return self.engine.has_unfinished_requests()

    def abort(self) -> list[int]:
        """Stop every turn in flight; the trajectories whose turns stopped (their tokens so far were delivered)."""
        if not self.deltas:
            raise RuntimeError(
                "abort() needs VLLMTurns(deltas=True): final-only turns would lose their tokens"
            )
        request_ids = list(self._key_of)
        if request_ids:
            self.engine.abort_request(request_ids)
        return [self._key_of.pop(r) for r in request_ids]
