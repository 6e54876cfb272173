"""The `RewardTrainer` actor: trains a Bradley-Terry or HaF-RM reward model as one rank of a DeepSpeed group
(the same plumbing as the policy learner), and writes the trained body plus head for reward shards to load."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from actors.learner.batch import pad_sequences
from actors.learner.dpo import PreferencePair, sequence_logprob_sums
from actors.learner.engine import build_engine, current_lr, init_process_group
from actors.learner.rank import DeepSpeedRank
from actors.learner.weights import full_state_dict
from actors.reward.haf import RewardLM, haf_loss


def _logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    logits = logits[:, :-1].float()
    return logits.gather(-1, input_ids[:, 1:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class RewardTrainer(DeepSpeedRank):
    """spec.haf_alpha = 0: plain BT (LM head unused); > 0: HaF with a frozen reference copy of the start model."""

    def setup(self, master_addr: str, master_port: int) -> dict:
        from transformers import AutoModelForCausalLM

        spec = self.spec
        start = time.perf_counter()
        on_gpu = init_process_group(spec, self.rank, master_addr, master_port)
        lm = AutoModelForCausalLM.from_pretrained(spec.model_path, dtype=torch.float32)
        lm.config.use_cache = False
        self.engine = build_engine(RewardLM(lm), spec, self.dtype, on_gpu)
        self.reference = None
        if spec.haf_alpha > 0:
            self.reference = AutoModelForCausalLM.from_pretrained(
                spec.model_path, dtype=getattr(torch, self.dtype)
            )
            self.reference.to(self.engine.device).eval().requires_grad_(False)
        pad = lm.config.pad_token_id
        self.pad_id = pad if pad is not None else 0
        return self._info(time.perf_counter() - start)

    def _tensors(self, pairs: Sequence[PreferencePair]):
        return pad_sequences(
            [p.prompt_ids for p in pairs] * 2,
            [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs],
            self.pad_id,
        )

    def train(self, pairs: Sequence[PreferencePair]) -> dict:
        spec, device = self.spec, self.engine.device
        start = time.perf_counter()
        n = len(pairs)
        ids, att, action = self._tensors(pairs)
        ref = self._reference_sums(ids, att, action) if self.reference is not None else None
        sums = {"loss": 0.0, "reward_loss": 0.0, "policy_loss": 0.0, "accuracy": 0.0, "margin": 0.0}
        grad_norms: list[float] = []
        micro = 0
        self.engine.train()
        for rows, boundary, scale in self.micro_batches(n):
            both = torch.cat([rows, rows + n])
            k = len(rows)
            reward, logits = self.engine(
                ids[both].to(device), att[both].to(device), with_logits=ref is not None
            )
            if ref is not None:
                seq = sequence_logprob_sums(_logprobs(logits, ids[both].to(device)), action[both].to(device))
                total, r_part, p_part = haf_loss(
                    reward[:k],
                    reward[k:],
                    seq[:k],
                    seq[k:],
                    ref[rows].to(device),
                    ref[rows + n].to(device),
                    spec.haf_alpha,
                    spec.dpo_beta,
                )
            else:
                total, r_part, p_part = haf_loss(
                    reward[:k], reward[k:], None, None, None, None, 0.0, spec.dpo_beta
                )
            loss = total.mean()
            self._step(loss, boundary, scale, grad_norms)
            micro += 1
            sums["loss"] += float(loss.detach())
            sums["reward_loss"] += float(r_part.mean().detach())
            sums["policy_loss"] += float(p_part.mean().detach())
            sums["accuracy"] += float((reward[:k] > reward[k:]).float().mean())
            sums["margin"] += float((reward[:k] - reward[k:]).mean().detach())
        metrics = {k: v / micro for k, v in sums.items()}
        metrics.update(
            pairs=n,
            lr=current_lr(self.engine),
            optimizer_steps=self.steps,
            grad_norm=sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
            train_s=time.perf_counter() - start,
        )
        return metrics

    @torch.no_grad()
    def _reference_sums(self, ids, att, action) -> torch.Tensor:
        out, step, device = [], self.spec.micro_batch_size * 2, self.engine.device
        for lo in range(0, ids.shape[0], step):
            sl = slice(lo, lo + step)
            logits = self.reference(input_ids=ids[sl].to(device), attention_mask=att[sl].to(device)).logits
            out.append(
                sequence_logprob_sums(_logprobs(logits, ids[sl].to(device)), action[sl].to(device)).cpu()
            )
        return torch.cat(out)

    @torch.no_grad()
    def rewards(self, pairs: Sequence[PreferencePair]) -> list[tuple[float, float]]:
        """(r_chosen, r_rejected) per pair under the current model."""
        ids, att, _ = self._tensors(pairs)
        self.engine.eval()
        out, n, step = [], len(pairs), self.spec.micro_batch_size * 2
        for lo in range(0, ids.shape[0], step):
            reward, _ = self.engine(
                ids[lo : lo + step].to(self.engine.device),
                att[lo : lo + step].to(self.engine.device),
                with_logits=False,
            )
            out.append(reward.float().cpu())
        r = torch.cat(out)
        return list(zip(r[:n].tolist(), r[n:].tolist(), strict=True))

    def save(self, folder: str, tokenizer_path: str) -> str | None:
        """Rank 0 writes the trained body as an HF causal LM plus `reward_head.safetensors` (collective)."""
        tensors = full_state_dict(self.engine, self.spec.zero_stage, torch.float32, self.rank == 0)
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
