"""Gathers a DeepSpeed engine's full state dict under any ZeRO stage, with HF parameter names.

Collective under ZeRO-3: every rank calls it; only `keep=True` ranks keep the gathered copy.
LoRA models export merged weights (adapters folded into the base), so consumers never see peft names.
"""

from __future__ import annotations

import torch

from actors.learner import lora


def full_state_dict(engine, zero_stage: int, dtype: torch.dtype, keep: bool) -> dict[str, torch.Tensor]:
    module = engine.module
    if lora.is_lora(module):
        return lora.merged_state_dict(module, dtype) if keep else {}
    out: dict[str, torch.Tensor] = {}
    if zero_stage == 3:
        import deepspeed

        # Gather one parameter at a time so peak memory stays at one full layer, not the whole model twice.
        for name, param in module.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if keep:
                    out[name] = param.detach().to(dtype).cpu().clone()
    elif keep:
        for name, param in module.named_parameters():
            out[name] = param.detach().to(dtype).cpu().clone()
    if keep:
        for name, buf in module.named_buffers():
            if name.endswith("inv_freq"):  # rotary caches are derived, not weights
                continue
            out.setdefault(name, buf.detach().cpu().clone())
    return out
