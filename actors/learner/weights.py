"""Gathers a DeepSpeed engine's full state dict under any ZeRO stage, with HF parameter names.

Collective under ZeRO-3: every rank calls it; only `keep=True` ranks keep the gathered copy.
LoRA models export merged weights (adapters folded into the base), so consumers never see peft names.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from troupe.actors.learner import lora


def iter_full_state(
    engine, zero_stage: int, dtype: torch.dtype, keep: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of every weight, without copies where the dtype already matches: each tensor may be the
    live parameter (or, under ZeRO-3, valid only until the next item), so the consumer copies it before moving on.
    Every rank must exhaust it under ZeRO-3 (each parameter is gathered collectively); only `keep` ranks get items.
    """
    module = engine.module
    if lora.is_lora(module):
        if keep:
            yield from lora.merged_state_dict(module, dtype).items()
        return
    if zero_stage == 3:
        import deepspeed

        # Gather one parameter at a time so peak memory stays at one full layer, not the whole model twice.
        for name, param in module.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if keep:  # a copy: the gathered parameter is released when the block ends
                    yield name, param.detach().to(dtype, copy=True)
    elif keep:
        for name, param in module.named_parameters():
            yield name, param.detach().to(dtype)
    if keep:
        names = {name for name, _ in module.named_parameters()}
        for name, buf in module.named_buffers():
            if name.endswith("inv_freq") or name in names:  # rotary caches are derived, not weights
                continue
            yield name, buf.detach()


def full_state_dict(engine, zero_stage: int, dtype: torch.dtype, keep: bool) -> dict[str, torch.Tensor]:
    """`iter_full_state` as CPU copies (empty on ranks that do not keep it)."""
    return {name: t.cpu().clone() for name, t in iter_full_state(engine, zero_stage, dtype, keep)}
