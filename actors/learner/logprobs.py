"""Per-token log-probabilities of response tokens at the rollout's sampling temperature.

The LM head and log-softmax run only at response positions, in chunks of `chunk` tokens whose logits are
recomputed in backward (activation checkpointing): no [batch, length, vocab] float32 tensor is ever held.
Models whose head does more than a linear layer (logit soft-capping, logit scales) take the plain full-logits path.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _causal_lm(model):
    """The transformers causal LM inside a DeepSpeed engine and/or a peft wrapper."""
    module = getattr(model, "module", model)  # DeepSpeed engine
    if hasattr(module, "get_base_model"):  # peft: the LoRA layers live inside the base model's modules
        module = module.get_base_model()
    return module


def _head_is_linear(lm) -> bool:
    cfg = lm.config
    return not getattr(cfg, "final_logit_softcapping", None) and getattr(cfg, "logit_scale", None) in (
        None,
        1.0,
    )


def _chunk_logprobs(hidden, targets, temperature, weight, bias, with_entropy: bool):
    return _from_logits(torch.nn.functional.linear(hidden, weight, bias), targets, temperature, with_entropy)


def _from_logits(logits, targets, temperature, with_entropy: bool):
    logits = logits.float() / temperature[:, None]
    norm = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - norm
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    with torch.no_grad():
        entropy = norm - (logits.softmax(-1) * logits).sum(-1)
    return logp, entropy


def response_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    action_mask: torch.Tensor,
    temperature: torch.Tensor,
    with_entropy: bool = False,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi_T(x_{t+1} | x_<=t), entropy) as [B, L-1] float32, zero outside `action_mask`.

    `temperature` [B] divides each row's logits (a temperature <= 0, i.e. greedy, is taken as 1).
    """
    lm = _causal_lm(model)
    positions = action_mask.bool()
    temps = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).to(input_ids.device)
    row_temps = temps[:, None].expand_as(positions)[positions].float()
    targets = input_ids[:, 1:][positions]
    logp = torch.zeros(action_mask.shape, dtype=torch.float32, device=input_ids.device)
    entropy = torch.zeros_like(logp)
    if _head_is_linear(lm):
        hidden = lm.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state[:, :-1][positions]
        head = lm.get_output_embeddings()
        parts = []
        for lo in range(0, hidden.shape[0], chunk):
            args = (hidden[lo : lo + chunk], targets[lo : lo + chunk], row_temps[lo : lo + chunk])
            if torch.is_grad_enabled():
                parts.append(
                    checkpoint(
                        _chunk_logprobs, *args, head.weight, head.bias, with_entropy, use_reentrant=False
                    )
                )
            else:
                parts.append(_chunk_logprobs(*args, head.weight, head.bias, with_entropy))
        if parts:
            logp[positions] = torch.cat([p[0] for p in parts])
            entropy[positions] = torch.cat([p[1] for p in parts]).detach()
        return logp, entropy
    logits = lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    values, ent = _from_logits(logits[positions], targets, row_temps, with_entropy)
    logp[positions] = values
    entropy[positions] = ent.detach()
    return logp, entropy
