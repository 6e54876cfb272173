"""The PPO critic: a causal LM body with a scalar value head, trained on its own DeepSpeed group.

V(s_t) is read at every position t (the state after token t), aligned with the policy's per-token tensors
([B, L-1], position t predicts token t+1). The `Critic` actor shares the learner's DeepSpeed plumbing.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from troupe.actors.learner.batch import RolloutBatch
from troupe.actors.learner.engine import build_engine, config_without_dropout, current_lr, load_partitioned
from troupe.actors.learner.ppo import explained_variance, value_loss
from troupe.actors.learner.rank import DeepSpeedRank
from troupe.actors.learner.step import micro_batches


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

        config = config_without_dropout(path, trust_remote_code)
        body = AutoModel.from_pretrained(
            path, config=config, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
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
        on_gpu = self.join_group(master_addr, master_port)
        model = load_partitioned(  # the value head, made after the body, is partitioned by DeepSpeed
            self.spec.train,
            self.dtype,
            on_gpu,
            lambda: ValueModel.from_pretrained(self.spec.model_path, self.spec.trust_remote_code),
        )
        self.engine = build_engine(model, self.spec, self.dtype, on_gpu)
        pad = model.config.pad_token_id
        self.pad_id = pad if pad is not None else 0
        return self._info(time.perf_counter() - start)

    def _forward(self, mb: RolloutBatch) -> torch.Tensor:
        device = self.engine.device
        return self.engine(mb.input_ids.to(device), mb.attention_mask.to(device))[:, :-1]

    @torch.no_grad()
    def _predict(self, batch: RolloutBatch) -> torch.Tensor:
        self.engine.eval()
        out = torch.zeros(batch.action_mask.shape)
        for rows in micro_batches(torch.arange(len(batch)), batch.lengths, self.spec.train.micro_batch_size):
            values = self._forward(batch.select(rows)).float().cpu()
            out[rows, : values.shape[1]] = values
        return out * batch.action_mask

    def values(self, batch: RolloutBatch) -> list[torch.Tensor]:
        """V(s_t) at each response token of each row, in order."""
        return batch.response_rows(self._predict(batch))

    def train(self, batch: RolloutBatch) -> dict:
        """Clipped value regression onto `batch.returns`; `batch.values` are the values the advantages used."""
        start = time.perf_counter()
        device, clip = self.engine.device, self.spec.value_clip

        def micro_loss(rows, norm):
            mb = batch.select(rows)
            m = mb.action_mask.to(device)
            per_token, clipped = value_loss(
                self._forward(mb).float(), mb.values.to(device), mb.returns.to(device), clip
            )
            loss = norm.per_token((per_token * m).sum())
            return loss, {"value_loss": loss.detach(), "value_clip_frac": norm.per_token((clipped * m).sum())}

        metrics = self.optimize(batch.lengths, batch.action_mask.sum(-1), micro_loss)
        mask = batch.action_mask
        metrics.update(
            explained_variance=explained_variance(batch.values, batch.returns, mask),
            values_mean=float((batch.values * mask).sum() / mask.sum().clamp(min=1.0)),
            lr=current_lr(self.engine),
            train_s=time.perf_counter() - start,
        )
        return metrics

    def value_loss_on(self, batch: RolloutBatch) -> float:
        """Unclipped token-mean value loss of the current critic against `batch.returns` (no update)."""
        pred = self._predict(batch)
        per_token, _ = value_loss(pred, pred, batch.returns, None)
        mask = batch.action_mask
        return float((per_token * mask).sum() / mask.sum().clamp(min=1.0))
