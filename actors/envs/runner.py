"""Many multi-turn trajectories at once on one engine: one loop that reads top to bottom.

Each trajectory alternates between the engine (an assistant turn, sampled with continuous batching next to every
other trajectory's turns) and its environment (a reset or a step, on the bounded call pool, polled against its
deadline). The loop never blocks on either: it steps the engine while any turn is being sampled, polls the
environment calls in between, and sleeps a millisecond only when everything in flight is an environment call.

A trajectory ends when its environment says done, at `max_turns` assistant turns, when its next observation would
pass `max_tokens` or a turn is cut at what is left of it (`max_tokens`), or on an environment error or timeout
(`error` / `timeout`: counted in env/errors, env/timeouts, and then dropped or scored as it stands, `on_error`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from troupe.actors.envs.calls import EnvCalls, EnvTimeout, PendingCall
from troupe.actors.envs.protocol import EnvError, check_messages, check_step
from troupe.actors.envs.trajectory import Trajectory, TurnEncoder

log = logging.getLogger("troupe.envs")
ENDS = ("done", "max_turns", "max_tokens", "error", "timeout")


@dataclass(frozen=True)
class Limits:
    max_turns: int = 4  # assistant turns per trajectory
    max_tokens: int = 512  # response-side tokens per trajectory (turns and observations)
    max_turn_tokens: int = 128  # tokens per assistant turn
    max_context: int = 2048  # prompt + response, at most the engine's max_model_len
    concurrent: int = 64  # trajectories in flight at once (the rest wait their turn)


@dataclass(frozen=True)
class TurnOutput:
    key: int  # the trajectory
    token_ids: list[int]  # new tokens since the last output of this turn
    logprobs: list[float]
    text: str  # new text since the last output of this turn
    finished: bool
    finish_reason: str  # "stop" or "length" once finished


class TurnEngine(Protocol):
    """What the runner needs from a generation backend (vLLM: actors/generator/vllm_turns.py)."""

    def submit(self, key: int, ids: list[int], max_tokens: int, seed: int | None) -> None: ...

    def step(self) -> list[TurnOutput]: ...

    def busy(self) -> bool: ...

    def abort(self) -> list[int]: ...  # stop every turn in flight; the trajectories whose turns stopped


class WeightSync(Protocol):
    """New weights that may arrive mid-run (partial rollouts): `due` when some wait, `apply` loads them between
    two engine steps and returns the new version."""

    def due(self) -> bool: ...

    def apply(self) -> int: ...


@dataclass
class _Live:
    traj: Trajectory
    env: object = None  # built on the call pool
    call: PendingCall | None = None  # the environment call in flight, if any
    turn_ids: list[int] | None = None  # the assistant turn being sampled
    turn_logprobs: list[float] | None = None
    turn_text: str = ""
    turn_room: int = 0  # the turn's token budget; cut there with the trajectory's budget spent: max_tokens
    turn_kept: int = 0  # tokens of this turn already in the trajectory (sampled before a weight sync)


def run_trajectories(
    engine: TurnEngine,
    encoder: TurnEncoder,
    make_env: Callable[[], object],
    prompts: Sequence,
    samples: int,
    version: int,
    limits: Limits,
    calls: EnvCalls,
    seed_of: Callable[[Trajectory], int] | None = None,  # a turn's sampling seed (deterministic runs)
    sync: WeightSync | None = None,
) -> tuple[list[Trajectory], Counter]:
    """`samples` trajectories per prompt, in (prompt, sample) order; and the env/* counts of the run. With
    `sync`, weights that arrive mid-run are loaded between engine steps: turns in flight keep what they sampled
    (with its version) and continue on the new weights (a partial rollout)."""
    counts: Counter = Counter()
    waiting = deque((p, s) for p in prompts for s in range(samples))
    finished: dict[int, Trajectory] = {}
    live: dict[int, _Live] = {}
    next_key = 0
    while waiting or live:
        if sync is not None and sync.due():
            version = _sync_weights(engine, live, sync, version, counts)
        while waiting and len(live) < limits.concurrent:  # start trajectories as room frees up
            prompt, sample = waiting.popleft()
            key, next_key = next_key, next_key + 1
            state = _Live(Trajectory(prompt, sample, [], []))
            state.call = calls.submit(make_env, what="start")  # a constructor may hang too
            live[key] = state
        for key, state in list(live.items()):  # environment calls that finished or ran out of time
            if state.call is None:
                continue
            done, value, error = state.call.poll()
            if not done:
                continue
            state.call = None
            if state.env is None and error is None:  # built: now its reset
                state.env = value
                state.call = calls.submit(value.reset, state.traj.prompt, what="reset")
                continue
            end = _after_env(state, value, error, encoder, limits, counts)
            if end:
                finished[key] = _ended(state.traj, end, state.traj.error)
                del live[key]
            else:
                _submit_turn(engine, key, state, limits, seed_of)
        if engine.busy():
            for out in engine.step():
                state = live[out.key]
                state.turn_ids += out.token_ids
                state.turn_logprobs += out.logprobs
                state.turn_text += out.text
                if not out.finished:
                    continue
                state.traj.add_tokens(state.turn_ids, state.turn_logprobs, version)
                if state.turn_kept:  # continued after a weight sync: one decode of the whole turn's ids
                    turn = state.traj.ids[len(state.traj.ids) - state.turn_kept - len(state.turn_ids) :]
                    state.turn_text = encoder.tokenizer.decode(turn, skip_special_tokens=True)
                state.traj.end_turn(state.turn_text)
                if out.finish_reason == "length" and state.turn_room < limits.max_turn_tokens:
                    finished[out.key] = _ended(state.traj, "max_tokens")
                    del live[out.key]
                    continue
                if out.finish_reason == "length":  # cut at max_turn_tokens: the environment sees it as it is
                    counts["turns_cut"] += 1
                state.call = calls.submit(state.env.step, state.traj.messages[-1], what="step")
        elif live:
            time.sleep(0.001)
    trajectories = [finished[k] for k in sorted(finished)]
    counts.update(f"ended/{t.end}" for t in trajectories)
    return trajectories, counts


def _after_env(state: _Live, value, error, encoder: TurnEncoder, limits: Limits, counts: Counter) -> str:
    """Apply a finished environment call; the reason the trajectory ends, or "" when it goes on."""
    traj = state.traj
    if isinstance(error, EnvTimeout):
        counts["timeouts"] += 1
        traj.error = str(error)
        return "timeout"
    try:
        if error is not None:
            raise error
        if not traj.prompt_ids:  # the reset
            messages = check_messages(value, "env.reset")
            traj.messages = messages
            tools = [t.schema() for t in getattr(state.env, "tools", None) or []]
            traj.prompt_ids = encoder.first(messages, tools)
            if len(traj.prompt_ids) + 1 > limits.max_context:
                raise EnvError(f"env.reset: {len(traj.prompt_ids)} prompt tokens, over {limits.max_context}")
            return ""
        step = check_step(value)
        counts.update(step.counts)
        traj.counts.update(step.counts)
        if step.done:
            traj.turn_rewards[-1] += step.reward
            return "done"
        if traj.turns >= limits.max_turns:
            traj.turn_rewards[-1] += step.reward
            return "max_turns"
        obs_ids = encoder.observation(list(step.observations), traj.ids[-1])
        if len(traj.ids) + len(obs_ids) + 1 > limits.max_tokens or (
            len(traj.prompt_ids) + len(traj.ids) + len(obs_ids) + 1 > limits.max_context
        ):
            traj.turn_rewards[-1] += step.reward
            return "max_tokens"
        traj.add_observation(list(step.observations), obs_ids, step.reward)
        return ""
    except Exception as e:  # noqa: BLE001 - user code and its output: counted, the trajectory ends
        counts["errors"] += 1
        traj.error = f"{type(e).__name__}: {e}"
        return "error"


def _sync_weights(engine: TurnEngine, live: dict[int, _Live], sync: WeightSync, version: int, counts) -> int:
    """Stop the turns in flight, keep what they sampled (old version), load the new weights, continue them."""
    stopped = engine.abort()
    for key in stopped:
        state = live[key]
        state.traj.add_tokens(state.turn_ids, state.turn_logprobs, version)
        state.turn_kept += len(state.turn_ids)
        state.turn_ids, state.turn_logprobs = [], []
    version = sync.apply()
    counts["weight_syncs"] += 1
    counts["partial_turns"] += len(stopped)
    for key in stopped:
        state = live[key]
        engine.submit(key, state.traj.context(), max(state.turn_room - state.turn_kept, 1), None)
    return version


def _submit_turn(engine: TurnEngine, key: int, state: _Live, limits: Limits, seed_of) -> None:
    traj = state.traj
    room = min(
        limits.max_turn_tokens,
        limits.max_tokens - len(traj.ids),
        limits.max_context - len(traj.prompt_ids) - len(traj.ids),
    )
    state.turn_ids, state.turn_logprobs, state.turn_text, state.turn_room, state.turn_kept = (
        [],
        [],
        "",
        room,
        0,
    )
    engine.submit(key, traj.context(), room, None if seed_of is None else seed_of(traj))


def _ended(traj: Trajectory, end: str, error: str = "") -> Trajectory:
    traj.end, traj.error = end, error
    if error:
        log.warning("trajectory %s#%d ended on %s: %s", traj.prompt.uid, traj.sample_index, end, error)
    return traj
