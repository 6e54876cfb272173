"""Per-token log-probabilities of response tokens at the rollout's sampling temperature.

The LM head and log-softmax run only at response positions, in chunks of `chunk` tokens whose logits are
recomputed in backward (activation checkpointing): no [batch, length, vocab] float32 tensor is ever held.
That path applies the head by hand, so it is used only where that equals the model's own logits: a plain
linear head (no soft-capping or logit scaling, no adapter on the head), parameters whole on this rank (not
ZeRO-3), and a one-time check against the full forward. Everything else takes the full-logits path.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from troupe.actors.learner.packing import Packed, pack_groups

GREEDY_EPS = 1e-5  # vLLM samples greedily below this temperature and reports log-probs at T = 1


def causal_lm(model):
    """The transformers causal LM inside a DeepSpeed engine and/or a peft wrapper."""
    module = getattr(model, "module", model)  # DeepSpeed engine
    if hasattr(module, "get_base_model"):  # peft: the LoRA layers live inside the base model's modules
        module = module.get_base_model()
    return module


def _head_is_plain(model, lm) -> bool:
    cfg = lm.config
    scaled = any(getattr(cfg, key, None) not in (None, 1.0) for key in ("logit_scale", "logits_scaling"))
    partitioned = getattr(model, "zero_optimization_partition_weights", lambda: False)()
    head = lm.get_output_embeddings()
    return (
        type(head) is torch.nn.Linear
        and not getattr(cfg, "final_logit_softcapping", None)
        and not scaled
        and not partitioned
    )


def _agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same log-probs up to low-precision noise: bf16 differs from fp32 by ~0.05 nats per token on average here,
    while a wrong mask, position or head scale is off by a nat or more."""
    return a.numel() == 0 or float((a - b).abs().mean()) < 0.1


def _chunk_logprobs(hidden, targets, temperature, head, with_entropy: bool):
    return _from_logits(head(hidden), targets, temperature, with_entropy)


def _from_logits(logits, targets, temperature, with_entropy: bool):
    logits = logits.float() / temperature[:, None]
    norm = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - norm
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    with torch.no_grad():
        entropy = norm - (logits.softmax(-1) * logits).sum(-1)
    return logp, entropy


def _fused(model, lm, ids, att, positions, targets, temps, with_entropy, chunk, packed: Packed | None = None):
    if packed is None:
        hidden = lm.base_model(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state
        hidden = hidden[:, :-1][positions]
    else:
        hidden = lm.base_model(
            input_ids=packed.input_ids.to(ids.device),
            attention_mask=packed.attention.to(ids.device),
            position_ids=packed.position_ids.to(ids.device),
            use_cache=False,
        ).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])[packed.source.to(ids.device)]
    return _head_logprobs(lm, hidden, targets, temps, with_entropy, chunk)


def _head_logprobs(lm, hidden, targets, temps, with_entropy, chunk):
    head = lm.get_output_embeddings()
    parts = []
    for lo in range(0, hidden.shape[0], chunk):
        args = (hidden[lo : lo + chunk], targets[lo : lo + chunk], temps[lo : lo + chunk], head, with_entropy)
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(*args))
    if (
        not parts
    ):  # no response token (a micro-batch of dropped samples): an empty result still tied to the graph
        anchor = 0.0 * (hidden.float().sum() + head.weight.float().sum())
        return hidden.new_zeros(0, dtype=torch.float32) + anchor, hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _full(model, ids, att, positions, targets, temps, with_entropy):
    logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits[:, :-1]
    return _from_logits(logits[positions], targets, temps, with_entropy)


def response_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    action_mask: torch.Tensor,
    temperature: torch.Tensor,
    with_entropy: bool = False,
    chunk: int = 1024,
    group_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi_T(x_{t+1} | x_<=t), entropy) as [B, L-1] float32, zero outside `action_mask`.

    `temperature` [B] divides each row's logits (a greedy row, T < GREEDY_EPS, is scored at T = 1). With
    `group_size` > 1, rows come in groups of that many samples of one prompt, which are packed (packing.py).
    """
    lm = causal_lm(model)
    positions = action_mask.bool()
    temps = torch.where(temperature > GREEDY_EPS, temperature, torch.ones_like(temperature)).to(
        input_ids.device
    )
    row_temps = temps[:, None].expand_as(positions)[positions].float()
    targets = input_ids[:, 1:][positions]
    args = (input_ids, attention_mask, positions, targets, row_temps, with_entropy)
    fused_ok = getattr(lm, "_troupe_fused_head", None)
    if fused_ok is None and not positions.any():
        fused_ok = (
            False  # nothing to compare yet: the full path now, the check on a call with response tokens
        )
    elif fused_ok is None:  # first call for this model: decide once, by checking against the full forward
        fused_ok = _head_is_plain(model, lm)
        if fused_ok:
            with torch.no_grad():
                fused, _ = _fused(model, lm, *args, chunk)
                full, _ = _full(model, *args)
            fused_ok = _agree(fused, full)  # catches scaled or capped heads
        lm._troupe_fused_head = fused_ok
    packed = (
        pack_groups(input_ids.cpu(), action_mask.cpu(), group_size) if fused_ok and group_size > 1 else None
    )
    if packed is not None and getattr(lm, "_troupe_packing", None) is None and positions.any():
        with torch.no_grad():  # first packed call for this model: packed must equal unpacked
            plain, _ = _fused(model, lm, *args, chunk)
            shared, _ = _fused(model, lm, *args, chunk, packed)
        lm._troupe_packing = _agree(plain, shared)
    if packed is not None and not getattr(lm, "_troupe_packing", False):
        packed = None
    if fused_ok:
        values, entropy = _fused(model, lm, *args, chunk, packed)
    else:
        values, entropy = _full(model, *args)
    logp = torch.zeros(action_mask.shape, dtype=torch.float32, device=input_ids.device)
    ent = torch.zeros_like(logp)
    logp[positions] = values
    ent[positions] = entropy.detach()
    # A micro-batch without response tokens (dropped samples) still backpropagates zeros through every parameter
    # from its one forward (`values` stays tied to the graph), so this rank reaches the same gradient hooks as its
    # peers: ZeRO reduces gradients in them, and a rank that skipped them would leave the others waiting.
    return logp, ent
