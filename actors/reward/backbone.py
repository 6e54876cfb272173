"""A frozen reward backbone: one forward pass gives, per (prompt, response), the last-token feature of the
response (ArmoRM stage 1) and the prompt feature at the end of the final user turn (ArmoRM stage 2's gate input).

Sequences are right-padded and features gathered at explicit indices, never at "first pad - 1" (ArmoRM pitfall 5:
with pad == end-of-turn that reads the user turn), nor at position -1 (HaF pitfall: a pad in the shorter side).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Encoded:
    input_ids: tuple[int, ...]
    prompt_end: int  # index of the last token of the final user turn (before the assistant header)
    response_start: int  # index of the first response token


def encode(tokenizer, prompt: Sequence[dict], response: str, max_length: int) -> Encoded:
    """Chat-templated prompt + response tokens + EOS; the prompt is cut from the left when too long."""
    head = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
    turn = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=False, tokenize=True)
    head, turn = _ids(head), _ids(turn)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    body = tokenizer(response, add_special_tokens=False)["input_ids"][: max(1, max_length // 2)] + eos
    cut = max(0, len(head) + len(body) - max_length)
    ids = head[cut:] + body
    return Encoded(tuple(ids), max(0, min(len(turn), len(head)) - 1 - cut), len(head) - cut)


def _ids(out):
    return list(out["input_ids"] if not isinstance(out, list) else out)


def pad_batch(encoded: Sequence[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
    return ids, mask


def gather_rows(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """hidden [B, L, d], index [B] -> [B, d]."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index.to(hidden.device)]


class RewardBackbone:
    """A causal LM body (no LM head) run frozen in eval mode; features in float32 on the CPU."""

    def __init__(
        self,
        path: str,
        dtype: str = "float32",
        device: str | None = None,
        max_length: int = 512,
        trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.path = path
        self.max_length = max_length
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.model = AutoModel.from_pretrained(
            path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        )
        self.model.to(self.device).eval().requires_grad_(False)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        self.hidden_size = self.model.config.hidden_size

    @torch.no_grad()
    def features(self, prompts: Sequence[Sequence[dict]], responses: Sequence[str], batch_size: int = 8):
        """(response_features [N, d], prompt_features [N, d]) in float32."""
        enc = [encode(self.tokenizer, p, r, self.max_length) for p, r in zip(prompts, responses, strict=True)]
        # Batch by length so padding is small; rows return in input order.
        order = sorted(range(len(enc)), key=lambda i: len(enc[i].input_ids))
        resp = torch.zeros(len(enc), self.hidden_size)
        prom = torch.zeros(len(enc), self.hidden_size)
        for lo in range(0, len(order), batch_size):
            rows = order[lo : lo + batch_size]
            chunk = [enc[i] for i in rows]
            ids, mask = pad_batch(chunk, self.pad_id)
            hidden = self.model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False
            ).last_hidden_state.float()
            resp[rows] = gather_rows(hidden, torch.tensor([len(e.input_ids) - 1 for e in chunk])).cpu()
            prom[rows] = gather_rows(hidden, torch.tensor([e.prompt_end for e in chunk])).cpu()
        return resp, prom
