"""The columnar batch that travels through score and learn: rollouts, rewards, advantages, values and returns
are its columns. Row i is one sampled response; rows come in prompt groups of `group_size` consecutive samples.

Shapes follow the convention "position t predicts token t+1": per-token columns are [B, L-1] and the response
tokens of row i sit under `action_mask[i] == 1`. No DeepSpeed or Ray here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch

from troupe.actors.learner.dpo import PreferencePair
from troupe.actors.protocol import ScoredRollout

_PER_ROW = ("rewards", "temperature", "weight_version")


@dataclass(frozen=True)
class RolloutBatch:
    input_ids: torch.Tensor  # [B, L] prompt + response, right-padded
    attention_mask: torch.Tensor  # [B, L]
    action_mask: torch.Tensor  # [B, L-1] float: 1 where position t predicts a response token
    behaviour_logprobs: torch.Tensor  # [B, L-1] the generator's log-probs (at its sampling temperature)
    rewards: torch.Tensor  # [B] the sequence reward (sum of token_rewards)
    token_rewards: torch.Tensor  # [B, L-1] the complete reward placed on response tokens
    temperature: torch.Tensor  # [B] the temperature each response was sampled at
    weight_version: torch.Tensor  # [B] long: the policy version that generated each response
    group_size: int = 1
    values: torch.Tensor | None = None  # [B, L-1] critic V(s_t) (PPO)
    advantages: torch.Tensor | None = None  # [B, L-1]
    returns: torch.Tensor | None = None  # [B, L-1] the critic's regression targets (PPO)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """Prompt + response tokens of each row."""
        return self.attention_mask.sum(-1)

    def select(self, rows: torch.Tensor | slice | Sequence[int]) -> RolloutBatch:
        """A row subset, trimmed to its own longest row (no padding beyond what these rows need)."""
        if not isinstance(rows, slice):
            rows = torch.as_tensor(rows, dtype=torch.long)
        width = int(self.attention_mask[rows].sum(-1).max()) if len(self.input_ids[rows]) else 1
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, torch.Tensor):
                out[f.name] = value
            elif f.name in _PER_ROW:
                out[f.name] = value[rows]
            elif f.name in ("input_ids", "attention_mask"):
                out[f.name] = value[rows][:, :width]
            else:
                out[f.name] = value[rows][:, : width - 1]
        return RolloutBatch(**out)

    def with_columns(self, **columns: torch.Tensor) -> RolloutBatch:
        return replace(self, **columns)

    def shares(self, parts: int, whole_groups: bool = True) -> list[RolloutBatch]:
        """Contiguous shares for `parts` ranks: equal sizes of whole prompt groups, or near-equal row counts."""
        if whole_groups and (len(self) // self.group_size) % parts:
            raise ValueError(
                f"{len(self) // self.group_size} prompt groups do not split evenly over {parts} ranks"
            )
        bounds = [round(len(self) * k / parts) for k in range(parts + 1)]
        return [self.select(slice(bounds[k], bounds[k + 1])) for k in range(parts)]

    def response_rows(self, per_token: torch.Tensor) -> list[torch.Tensor]:
        """Row-wise response-token entries of a [B, L-1] tensor, as variable-length 1-D tensors."""
        return [per_token[i][self.action_mask[i].bool()].clone() for i in range(len(self))]

    def place(self, per_row: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of `response_rows`: scatter per-response 1-D tensors into a [B, L-1] tensor."""
        return place(self.action_mask, per_row)


def place(action_mask: torch.Tensor, per_row: Sequence[torch.Tensor]) -> torch.Tensor:
    out = torch.zeros(action_mask.shape, dtype=torch.float32)
    for i, values in enumerate(per_row):
        out[i][action_mask[i].bool()] = values.float()
    return out


def pad_sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int):
    """Right-padded input_ids, attention_mask [B, L] and action_mask [B, L-1] for prompt + response rows."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    n = len(prompts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    action = torch.zeros((n, width - 1), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        input_ids[i, : len(p) + len(r)] = torch.tensor(tuple(p) + tuple(r))
        attention[i, : len(p) + len(r)] = 1
        action[i, len(p) - 1 : len(p) + len(r) - 1] = 1.0
    return input_ids, attention, action


def from_scored(scored: Sequence[ScoredRollout], pad_id: int, group_size: int) -> RolloutBatch:
    """Collate scored rollouts into columns. A rollout whose reward has no per-token placement gets its scalar
    on its last response token; a dropped rollout (`reward.dropped`) has no response tokens in the action mask,
    nor do a trajectory's observation tokens (`loss_mask` 0)."""
    rollouts = [s.rollout for s in scored]
    input_ids, attention, action = pad_sequences(
        [r.prompt.token_ids for r in rollouts], [r.response_ids for r in rollouts], pad_id
    )
    behaviour = torch.zeros(action.shape)
    token_rewards = torch.zeros(action.shape)
    for i, s in enumerate(scored):
        r = s.rollout
        n = len(r.response_ids)
        if s.reward.dropped:  # left out of training: no loss, no reward (its group is dropped whole)
            action[i] = 0
            continue
        if n == 0:
            continue
        span = slice(len(r.prompt.token_ids) - 1, len(r.prompt.token_ids) - 1 + n)
        if r.loss_mask is not None:  # a trajectory's observations: context, not actions
            action[i, span] *= torch.tensor(r.loss_mask, dtype=torch.float32)
        behaviour[i, span] = r.logprobs.float()
        dense = s.reward.token_rewards
        if dense is not None:
            if len(dense) != n:
                raise ValueError(
                    f"rollout {r.prompt.uid}#{r.sample_index}: {len(dense)} token rewards for {n} response tokens"
                )
            token_rewards[i, span] = torch.as_tensor(dense, dtype=torch.float32)
        else:
            token_rewards[i, span.stop - 1] = s.reward.scalar
    return RolloutBatch(
        input_ids,
        attention,
        action,
        behaviour,
        torch.tensor([s.reward.scalar for s in scored], dtype=torch.float32),
        token_rewards,
        torch.tensor([r.temperature for r in rollouts], dtype=torch.float32),
        torch.tensor([r.weight_version for r in rollouts], dtype=torch.long),
        group_size,
    )


def pair_batch(pairs: Sequence[PreferencePair], pad_id: int) -> RolloutBatch:
    """Preference pairs as a batch: rows 0..P-1 the chosen responses, rows P..2P-1 the rejected ones (T = 1)."""
    ids, att, action = pad_sequences(
        [p.prompt_ids for p in pairs] * 2,
        [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs],
        pad_id,
    )
    n = ids.shape[0]
    zeros = torch.zeros(action.shape)
    return RolloutBatch(
        ids, att, action, zeros, torch.zeros(n), zeros, torch.ones(n), torch.zeros(n, dtype=torch.long)
    )


def pair_rows(pairs: torch.Tensor, n_pairs: int) -> torch.Tensor:
    """Rows of a pair batch for these pair indices: their chosen rows, then their rejected rows."""
    return torch.cat([pairs, pairs + n_pairs])


def pair_lengths(batch: RolloutBatch) -> torch.Tensor:
    """Per pair, the longer of its two rows (what a micro-batch of pairs pads to)."""
    n = len(batch) // 2
    return torch.maximum(batch.lengths[:n], batch.lengths[n:])
