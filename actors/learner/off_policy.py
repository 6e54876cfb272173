"""Off-policy correction: the generator's sampling distribution (behaviour, pi_b: vLLM's log-probs, an older
weight version in async mode, another numeric path) is not the learner's (pi_old, its log-probs before this
update). Each mode turns rho_t = pi_old / pi_b on a row's response tokens into per-token loss weights:

  token_tis  min(rho_t, cap)                                      truncated IS per token (verl, SkyRL, OpenRLHF)
  seq_tis    min(prod_t rho_t, cap), on every token of the row    sequence-level IS (verl, SkyRL)
  seq_mask   prod_t rho_t if low <= it <= high, else 0            sequence-level masked IS (TRL's sequence_mask,
                                                                  its default)
  geo_mask   1 if low <= exp(mean_t log rho_t) <= high, else 0    geometric-mean rejection of the whole row
                                                                  (SkyRL's geometric mask, verl's seq_mean_k1)
  icepop     rho_t if low <= rho_t <= high, else 0                IcePop token masking (AReaL, OpenRLHF, slime)

Weights are detached; masked tokens give no gradient but stay in the loss's token count (as AReaL and SkyRL
do), so a mask does not inflate the remaining tokens' share; `tis/masked_frac` counts tokens (a geo_mask row
counts all its tokens). A NaN log-prob is not masked here: its NaN loss skips the step
(faults/nonfinite_updates). Log-ratios are clamped before exp. Rows are whole in every micro-batch, so the per-row sums and means do not depend on the micro-batch size."""

from __future__ import annotations

import torch

from troupe.actors.learner.config import CORRECTIONS, LOG_RATIO_CLAMP

DEFAULT_BOUNDS = {
    "seq_mask": (0.0, 3.0),
    "geo_mask": (0.99, 1.01),
    "icepop": (0.5, 5.0),
}  # TRL's vllm_importance_sampling_clip_min/max; SkyRL's geometric mask; IcePop's alpha, beta


def correction_weights(
    mode: str,
    old_logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    mask: torch.Tensor,
    cap: float,
    bounds: tuple[float | None, float | None] = (None, None),
    clamp: float = LOG_RATIO_CLAMP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, T] weights, [B, T] bool: response tokens a bound masked out). `cap` bounds the IS modes' weights,
    `bounds` (low, high) the masking modes' test (a None: the mode's DEFAULT_BOUNDS)."""
    m = mask.bool()
    log_rho = torch.where(m, (old_logp - behaviour_logp).detach().float(), 0.0).clamp(-clamp, clamp)
    no_mask = torch.zeros_like(m)
    row = torch.exp(log_rho.sum(-1).clamp(-clamp, clamp))  # the sequence's importance weight, prod_t rho_t
    if mode == "token_tis":
        return torch.exp(log_rho).clamp(max=cap), no_mask
    if mode == "seq_tis":
        return row.clamp(max=cap)[:, None].expand_as(log_rho).clone(), no_mask
    default_low, default_high = DEFAULT_BOUNDS.get(mode, (0.0, 0.0))
    low = default_low if bounds[0] is None else bounds[0]
    high = default_high if bounds[1] is None else bounds[1]
    if mode == "seq_mask":
        keep = ((row >= low) & (row <= high))[:, None].expand_as(m)
        return torch.where(keep, row[:, None], 0.0), m & ~keep
    if mode == "geo_mask":
        geometric = torch.exp(log_rho.sum(-1) / m.sum(-1).clamp(min=1))
        keep = ((geometric >= low) & (geometric <= high))[:, None].expand_as(m)
        return keep.float(), m & ~keep
    if mode == "icepop":
        rho = torch.exp(log_rho)
        keep = (rho >= low) & (rho <= high)
        return torch.where(keep, rho, 0.0), m & ~keep
    raise ValueError(f"off-policy correction must be one of {', '.join(CORRECTIONS)}, got {mode!r}")


def mismatch_kl(
    old_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor, clamp: float = LOG_RATIO_CLAMP
) -> torch.Tensor:
    """[B, T] per-token k3 estimate of KL(pi_b || pi_old) from the generator's samples: rho - 1 - log rho
    (verl's rollout_corr/k3_kl), 0 off the response tokens."""
    log_rho = torch.where(mask.bool(), (old_logp - behaviour_logp).detach().float(), 0.0).clamp(-clamp, clamp)
    return torch.expm1(log_rho) - log_rho
