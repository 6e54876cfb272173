"""The environment protocol: what a multi-turn trajectory talks to, loaded by import path (`env.target`), one
instance per trajectory.

    class Guess:                                   # env.target: mypkg.envs:Guess
        def __init__(self, secret: int = 7):       # env.kwargs are passed here
            self.secret = secret
        def reset(self, prompt):                   # -> the first messages (the prompt's chat, or your own)
            return prompt.chat()
        def step(self, message):                   # the assistant's message -> what comes back
            right = message["content"].strip() == str(self.secret)
            return StepResult(observations=[] if right else [{"role": "user", "content": "No, try again."}],
                              reward=float(right), done=right)

Both methods may be `async def`. `tools` (a list of Tool, optional) are offered to the model through its chat
template. Each call runs under `env.step_timeout_s`; an exception or a timeout ends the trajectory as
`env.on_error` says (dropped, or scored as it stands) and is counted in env/errors or env/timeouts. A trajectory
ends when `done`, at `env.max_turns` assistant turns, or at `env.max_tokens` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

ROLES = ("system", "user", "assistant", "tool")
MAX_MESSAGE_CHARS = 20_000  # an observation larger than this is an environment error, not a context flood


class EnvError(ValueError):
    """An environment returned something that is not what the protocol says; names the method and the field."""


@dataclass(frozen=True)
class StepResult:
    # observations: the messages after the assistant's (tool results, the next user turn); reward: this turn's,
    # placed on the turn's last generated token; counts: summed into env/<name> (e.g. tool_calls, tool_errors)
    observations: tuple[dict, ...] | list[dict] = ()
    reward: float = 0.0
    done: bool = False
    counts: dict[str, int] = field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    def reset(self, prompt) -> Any: ...

    def step(self, message: dict) -> Any: ...


def check_messages(value: Any, where: str) -> list[dict]:
    """`value` as a list of {role, content} messages, or EnvError naming the first bad one."""
    if not isinstance(value, list | tuple):
        raise EnvError(f"{where}: expected a list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise EnvError(
                f"{where}[{i}]: expected {{'role': one of {ROLES}, 'content': str}}, got {m!r:.200}"
            )
        if len(m["content"]) > MAX_MESSAGE_CHARS:
            raise EnvError(
                f"{where}[{i}]: content of {len(m['content'])} characters (at most {MAX_MESSAGE_CHARS})"
            )
        out.append({k: v for k, v in m.items() if k in ("role", "content", "name")})
    return out


def check_step(value: Any, where: str = "env.step") -> StepResult:
    if not isinstance(value, StepResult):
        raise EnvError(f"{where}: expected a StepResult, got {type(value).__name__}")
    reward = value.reward
    if isinstance(reward, bool) or not isinstance(reward, int | float) or not math.isfinite(reward):
        raise EnvError(f"{where}: reward={reward!r} is not a finite number")
    if not isinstance(value.done, bool):
        raise EnvError(f"{where}: done={value.done!r} is not a bool")
    observations = check_messages(value.observations, f"{where}.observations")
    if not value.done and not observations:
        raise EnvError(f"{where}: not done but no observation for the model to answer")
    if any(m["role"] == "assistant" for m in observations):
        raise EnvError(f"{where}.observations: an environment cannot speak as the assistant")
    return StepResult(tuple(observations), float(reward), value.done, dict(value.counts))
