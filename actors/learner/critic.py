"""The PPO critic: a causal LM body with a scalar value head, trained on its own DeepSpeed group.

V(s_t) is read at every position t (the state after token t), aligned with the policy's per-token tensors
([B, L-1], position t predicts token t+1). The `Critic` actor shares the learner's DeepSpeed plumbing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from actors.learner.batch import TrainSample, collate, place, response_slices
from actors.learner.engine import build_engine, current_lr, init_process_group
from actors.learner.grpo import aggregate
from actors.learner.ppo import explained_variance, value_loss
from actors.learner.rank import DeepSpeedRank


class ValueModel(nn.Module):
    """Transformer body (no LM head) plus a linear head giving one value per position."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.config = body.config
        self.value_head = nn.Linear(body.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)  # V = 0 at start: GAE begins as plain reward-to-go
        nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_pretrained(cls, path: str, trust_remote_code: bool = False) -> ValueModel:
        from transformers import AutoModel

        body = AutoModel.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code)
        body.config.use_cache = False
        return cls(body)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.body.gradient_checkpointing_enable(**kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.body(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        return self.value_head(hidden).squeeze(-1).float()


class Critic(DeepSpeedRank):
    def setup(self, master_addr: str, master_port: int) -> dict:
        start = time.perf_counter()
        on_gpu = init_process_group(self.spec, self.rank, master_addr, master_port)
        model = ValueModel.from_pretrained(self.spec.model_path, self.spec.trust_remote_code)
        self.engine = build_engine(model, self.spec, self.dtype, on_gpu)
        pad = model.config.pad_token_id
        self.pad_id = pad if pad is not None else 0
        return self._info(time.perf_counter() - start)

    @torch.no_grad()
    def values(self, samples: Sequence[TrainSample]) -> list[torch.Tensor]:
        """V(s_t) at each response token of each sample, in order."""
        batch = collate(samples, self.pad_id)
        self.engine.eval()
        out = []
        step = self.spec.micro_batch_size
        for lo in range(0, len(batch), step):
            mb = batch.select(slice(lo, lo + step))
            out.append(self._forward(mb).cpu())
        return response_slices(batch, torch.cat(out))

    def _forward(self, mb) -> torch.Tensor:
        device = self.engine.device
        return self.engine(mb.input_ids.to(device), mb.attention_mask.to(device))[:, :-1]

    def train(self, samples: Sequence[TrainSample], returns: Sequence[torch.Tensor]) -> dict:
        """Clipped value regression onto `returns`; `samples[i].values` are the values the advantages used."""
        start = time.perf_counter()
        spec, device = self.spec, self.engine.device
        batch = collate(samples, self.pad_id)
        targets, old_values = place(batch.action_mask, returns), batch.values
        sums = {"value_loss": 0.0, "value_clip_frac": 0.0}
        grad_norms: list[float] = []
        micro = 0
        self.engine.train()
        for rows, boundary, scale in self.micro_batches(len(batch)):
            mb = batch.select(rows)
            m = mb.action_mask.to(device)
            per_token, clipped = value_loss(
                self._forward(mb), old_values[rows].to(device), targets[rows].to(device), spec.value_clip
            )
            loss = aggregate(per_token, m, "token_mean")
            self._step(loss, boundary, scale, grad_norms)
            micro += 1
            sums["value_loss"] += float(loss.detach())
            sums["value_clip_frac"] += float(aggregate(clipped, m, "token_mean"))
        metrics = {k: v / micro for k, v in sums.items()}
        metrics.update(
            explained_variance=explained_variance(old_values, targets, batch.action_mask),
            values_mean=float((old_values * batch.action_mask).sum() / batch.action_mask.sum()),
            grad_norm=sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
            lr=current_lr(self.engine),
            train_s=time.perf_counter() - start,
        )
        return metrics

    @torch.no_grad()
    def value_loss_on(self, samples: Sequence[TrainSample], returns: Sequence[torch.Tensor]) -> float:
        """Unclipped value loss of the current critic on a fixed batch (to check that training lowers it)."""
        batch = collate(samples, self.pad_id)
        self.engine.eval()
        pred = torch.cat(
            [
                self._forward(batch.select(slice(lo, lo + self.spec.micro_batch_size))).cpu()
                for lo in range(0, len(batch), self.spec.micro_batch_size)
            ]
        )
        per_token, _ = value_loss(pred, pred, place(batch.action_mask, returns), None)
        return float(aggregate(per_token, batch.action_mask, "token_mean"))
