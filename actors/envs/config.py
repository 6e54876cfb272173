"""Typed config of multi-turn environments: the Hydra schema's `env` group (unset: single-turn generation).
No Ray or vLLM imports here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from troupe.actors.envs.runner import Limits
from troupe.actors.field_domains import bounded, one_of


@dataclass
class EnvConfig:
    target: Any = None  # import path of the environment class or factory (one instance per trajectory)
    kwargs: dict[str, Any] = field(default_factory=dict)
    step_timeout_s: float = bounded(30.0, gt=0)  # per reset or step call
    workers: int = bounded(8, ge=1)  # threads for environment calls, per generator
    max_turns: int = bounded(4, ge=1)
    max_tokens: int = bounded(512, ge=1)  # response-side tokens per trajectory: turns and observations
    concurrent: int = bounded(64, ge=1)  # trajectories in flight per generator
    # drop: a trajectory that ended on an environment error or timeout carries no loss (accounted, dropped:
    # env_error); score: it is scored as it stands
    on_error: str = one_of("drop", "score")
    # Weights pushed while trajectories are generated (run.mode=async) load between engine steps: turns in flight
    # keep their tokens and log-probs (old version) and continue on the new weights. False: they finish first.
    partial_rollouts: bool = True

    def limits(self, max_turn_tokens: int, max_context: int) -> Limits:
        return Limits(self.max_turns, self.max_tokens, max_turn_tokens, max_context, self.concurrent)

    def factory(self) -> Callable[[], Any]:
        """What builds one environment per trajectory: `target` (an import path, `dir/file.py:Name`, or from
        Python the class itself) called with `kwargs`. Errors name env.target."""
        from troupe.actors.plugins import PluginError
        from troupe.actors.reward.objective import load_target

        if self.target is None:
            raise PluginError(
                "env.target: not set (name an environment class, e.g. troupe.actors.envs.builtin:ToolEnv)"
            )
        found = load_target(self.target, "env.target")
        if not callable(found):
            raise PluginError(
                f"env.target: {self.target} is a {type(found).__name__}, not a class or factory"
            )
        kwargs = dict(self.kwargs)
        return lambda: found(**kwargs)
