"""A multi-turn trajectory as token ids, exactly as the generator saw them (token in, token out).

The first messages are chat-templated once. After that, each assistant turn appends the ids the engine sampled
(never re-tokenised text), and each observation appends the template's rendering of the new messages alone,
sliced from a fixed base conversation (what a template adds after a turn's end token, then the new messages, then
the next generation prompt). The base is a single user turn, as SkyRL does: templates that re-render earlier
assistant turns (Qwen3 drops their <think> blocks) see none; a template whose user turns do not end with the EOS
token (Llama 2, Mistral: [INST] ... [/INST]) gets a user turn and an assistant turn instead. So the ids the learner trains on are the ids the engine sampled
and conditioned on, with no drift from detokenising and re-tokenising (the mismatch TRL, verl and SkyRL each
worked around). Observation tokens carry no loss (loss_mask 0), no log-prob and no weight version (-1).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from troupe.actors.envs.protocol import EnvError

USER_BASE = [{"role": "user", "content": "x"}]
TWO_TURN_BASE = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
OBSERVATION = -1  # the version of a token the model did not write


class TurnEncoder:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        for base in (USER_BASE, TWO_TURN_BASE):
            self.base_messages, self.base = base, self._ids(base, generation_prompt=False)
            ends = [i for i, t in enumerate(self.base) if t == self.eos]
            if ends:
                break
        else:
            raise EnvError(
                "the chat template does not end an assistant turn with the EOS token; multi-turn needs it"
            )
        self.cut = ends[-1] + 1  # the base's last turn ends here; what follows belongs to the next messages

    def _ids(
        self, messages: list[dict], generation_prompt: bool, tools: list[dict] | None = None
    ) -> list[int]:
        extra = {"tools": tools} if tools else {}
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **extra
        )
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def first(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The first messages, templated with the environment's tool schemas (`tools=`: templates that render
        them, Qwen's or Llama 3.1's, put them where the model was trained to read them; others ignore them)."""
        return self._ids(messages, generation_prompt=True, tools=tools)

    def observation(self, messages: list[dict], last_token: int) -> list[int]:
        """The ids that continue a conversation after an assistant turn whose last sampled token is `last_token`:
        the turn's end token when the engine stopped on another one, the new messages, then the generation
        prompt of the next assistant turn."""
        full = self._ids(self.base_messages + messages, generation_prompt=True)
        if full[: self.cut] != self.base[: self.cut]:
            raise EnvError(
                "the chat template changes earlier turns when messages are added; cannot continue it"
            )
        return ([] if last_token == self.eos else [self.eos]) + full[self.cut :]


@dataclass
class Trajectory:
    prompt: object  # the Prompt it started from
    sample_index: int
    prompt_ids: list[int]
    messages: list[dict]  # the conversation as text (reward models and judges read it)
    ids: list[int] = field(default_factory=list)  # everything after prompt_ids: turns and observations
    loss_mask: list[int] = field(default_factory=list)  # 1 on generated tokens
    logprobs: list[float] = field(default_factory=list)  # behaviour log-probs; 0.0 on observations
    versions: list[int] = field(default_factory=list)  # weight version per token; OBSERVATION on observations
    turn_ends: list[int] = field(default_factory=list)  # index in `ids` of each turn's last generated token
    turn_rewards: list[float] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    end: str = ""  # why it ended: done, max_turns, max_tokens, error, timeout (runner.ENDS)
    error: str = ""  # the environment's error or timeout, when it ended on one

    @property
    def turns(self) -> int:
        return len(self.turn_ends)

    def add_tokens(self, ids: list[int], logprobs: list[float], version: int) -> None:
        """Sampled tokens of the current turn: all of it, or the part sampled before a weight sync (a partial
        rollout; the rest follows with the new version)."""
        if len(ids) != len(logprobs):
            raise ValueError(f"{len(ids)} sampled tokens with {len(logprobs)} log-probs")
        self.ids += ids
        self.loss_mask += [1] * len(ids)
        self.logprobs += [float(x) for x in logprobs]
        self.versions += [version] * len(ids)

    def end_turn(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})
        self.turn_ends.append(len(self.ids) - 1)
        self.turn_rewards.append(0.0)

    def add_turn(self, ids: list[int], logprobs: list[float], version: int, text: str) -> None:
        """One whole assistant turn, sampled with one weight version."""
        self.add_tokens(ids, logprobs, version)
        self.end_turn(text)

    def add_observation(self, messages: list[dict], ids: list[int], reward: float) -> None:
        self.turn_rewards[-1] += reward  # the env's reward for the turn just taken
        self.messages += messages
        self.ids += ids
        self.loss_mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.versions += [OBSERVATION] * len(ids)

    def context(self) -> list[int]:
        """What the next turn is generated from."""
        return self.prompt_ids + self.ids


def to_rollout(traj: Trajectory, temperature: float, on_error: str):
    """The trajectory as a Rollout: its prompt is what the environment's reset gave (templated), its response
    every turn and observation; the reply the reward objectives read is the last assistant message."""
    import dataclasses

    import torch

    from troupe.actors.protocol import Rollout

    first = traj.messages[: len(traj.messages) - len(_after_prompt(traj))]
    prompt = dataclasses.replace(
        traj.prompt,
        token_ids=tuple(traj.prompt_ids) or traj.prompt.token_ids,
        messages=tuple((m["role"], m["content"]) for m in first) or traj.prompt.messages,
    )
    replies = [m["content"] for m in traj.messages if m["role"] == "assistant"]
    versions = [v for v in traj.versions if v != OBSERVATION]
    counts = {"turns": traj.turns, f"ended/{traj.end}": 1, **traj.counts}
    failed = f"env_{traj.end}" if traj.end in ("error", "timeout") and on_error == "drop" else ""
    return Rollout(
        prompt=prompt,
        sample_index=traj.sample_index,
        response_ids=tuple(traj.ids),
        response_text=replies[-1] if replies else "",
        logprobs=torch.tensor(traj.logprobs, dtype=torch.float32),
        weight_version=min(versions) if versions else 0,  # the oldest weights any of its tokens came from
        finish_reason="length" if traj.end == "max_tokens" else "stop",
        temperature=temperature,
        loss_mask=tuple(traj.loss_mask),
        versions=tuple(traj.versions),
        turn_ends=tuple(traj.turn_ends),
        turn_rewards=tuple(traj.turn_rewards),
        conversation=tuple((m["role"], m["content"]) for m in _after_prompt(traj)),
        env_counts=tuple(sorted(counts.items())),
        failed=failed,
    )


def _after_prompt(traj: Trajectory) -> list[dict]:
    """The messages from the first assistant turn on."""
    for i, m in enumerate(traj.messages):
        if m["role"] == "assistant":
            return traj.messages[i:]
    return []
