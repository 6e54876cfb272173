"""The `RewardTrainer` actor: trains a Bradley-Terry or HaF-RM reward model as one rank of a DeepSpeed group
(the same plumbing as the policy learner), and writes the trained body plus head for reward shards to load."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from troupe.actors.learner.batch import pair_batch, pair_lengths, pair_rows
from troupe.actors.learner.dpo import PreferencePair
from troupe.actors.learner.engine import (
    build_engine,
    current_lr,
    frozen_reference,
    load_causal_lm,
    load_partitioned,
)
from troupe.actors.learner.rank import DeepSpeedRank
from troupe.actors.learner.weights import full_state_dict
from troupe.actors.reward.haf import RewardLM, haf_loss


def _sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """Summed response-token log-probs (T = 1) from full logits, in float32."""
    logits = logits[:, :-1].float()
    logp = logits.gather(-1, input_ids[:, 1:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (logp * action).sum(-1)


class RewardTrainer(DeepSpeedRank):
    """spec.haf_alpha = 0: plain BT (LM head unused); > 0: HaF with a frozen reference copy of the start model."""

    def setup(self, master_addr: str, master_port: int) -> dict:
        spec = self.spec
        start = time.perf_counter()
        on_gpu = self.join_group(master_addr, master_port)
        lm = load_partitioned(spec.train, self.dtype, on_gpu, lambda: load_causal_lm(spec))
        self.engine = build_engine(RewardLM(lm), spec, self.dtype, on_gpu)
        self.reference = (
            frozen_reference(spec, self.dtype, self.engine.device, on_gpu) if spec.haf_alpha > 0 else None
        )
        pad = lm.config.pad_token_id
        self.pad_id = pad if pad is not None else 0
        return self._info(time.perf_counter() - start)

    def train(self, pairs: Sequence[PreferencePair]) -> dict:
        """Bradley-Terry (+ HaF's policy term) over this rank's pairs, through the shared optimizer-step loop."""
        spec, device = self.spec, self.engine.device
        start = time.perf_counter()
        n = len(pairs)
        batch = pair_batch(pairs, self.pad_id)
        ref = self.batch_logprobs(self.reference, batch).sum(-1) if self.reference is not None else None

        def micro_loss(rows, norm):
            mb = batch.select(pair_rows(rows, n))
            k = len(rows)
            reward, logits = self.engine(
                mb.input_ids.to(device), mb.attention_mask.to(device), with_logits=ref is not None
            )
            if ref is not None:
                seq = _sequence_logprobs(logits, mb.input_ids.to(device), mb.action_mask.to(device))
                total, r_part, p_part = haf_loss(
                    reward[:k],
                    reward[k:],
                    seq[:k],
                    seq[k:],
                    ref[rows].to(device),
                    ref[rows + n].to(device),
                    spec.haf_alpha,
                    spec.haf_beta,
                )
            else:
                total, r_part, p_part = haf_loss(
                    reward[:k], reward[k:], None, None, None, None, 0.0, spec.haf_beta
                )
            loss = norm.per_sequence(total.sum())
            return loss, {
                "loss": loss.detach(),
                "reward_loss": norm.per_sequence(r_part.detach().sum()),
                "policy_loss": norm.per_sequence(p_part.detach().sum()),
                "accuracy": norm.per_sequence((reward[:k] > reward[k:]).float().sum()),
                "margin": norm.per_sequence((reward[:k] - reward[k:]).detach().sum()),
            }

        metrics = self.optimize(pair_lengths(batch), torch.ones(n), micro_loss)
        metrics.update(
            pairs=n,
            lr=current_lr(self.engine),
            optimizer_steps=self.steps,
            train_s=time.perf_counter() - start,
        )
        return metrics

    def save(self, folder: str, tokenizer_path: str) -> str | None:
        """Rank 0 writes the trained body as an HF causal LM plus `reward_head.safetensors` (collective)."""
        tensors = full_state_dict(self.engine, self.spec.train.zero_stage, torch.float32, self.rank == 0)
        if self.rank != 0:
            return None
        from safetensors.torch import save_file
        from transformers import AutoTokenizer

        body = {k.removeprefix("lm."): v for k, v in tensors.items() if k.startswith("lm.")}
        self.engine.module.lm.save_pretrained(folder, state_dict=body, safe_serialization=True)
        head = {
            k.removeprefix("reward_head."): v.contiguous()
            for k, v in tensors.items()
            if k.startswith("reward_head.")
        }
        save_file(head, f"{folder}/reward_head.safetensors")
        AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(folder)
        return folder
