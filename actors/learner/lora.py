"""LoRA through peft: only adapter weights train; generators and checkpoints get merged full weights.

The frozen base doubles as the reference policy (adapters disabled), so LoRA runs load no second model.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from troupe.actors.learner.config import LoraConfig

_PREFIX = "base_model.model."


def wrap(model: torch.nn.Module, spec: LoraConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def is_lora(module: torch.nn.Module) -> bool:
    return hasattr(module, "disable_adapter") and hasattr(module, "peft_config")


def base_model(module: torch.nn.Module):
    """Context in which `module` runs as the frozen base model (the reference policy)."""
    return module.disable_adapter() if is_lora(module) else nullcontext()


@torch.no_grad()
def merged_state_dict(module: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF-named full weights with W + scale * B @ A folded in; the live model is not modified."""
    from peft.tuners.lora.layer import LoraLayer

    deltas = {}
    for name, sub in module.named_modules():
        if isinstance(sub, LoraLayer):
            deltas[f"{name}.base_layer.weight"] = sum(
                sub.get_delta_weight(adapter) for adapter in sub.active_adapters
            )
    out = {}
    for name, param in module.named_parameters():
        if ".lora_" in name:
            continue
        value = param.detach()
        if name in deltas:
            value = value + deltas[name].to(value.dtype)
        hf_name = name.removeprefix(_PREFIX).replace(".base_layer.", ".")
        out[hf_name] = value.to(dtype).cpu().clone()
    return out


def trainable_fraction(module: torch.nn.Module) -> float:
    sizes = [
        (getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in module.parameters()
    ]  # ZeRO-3: full
    return sum(n for n, trained in sizes if trained) / max(sum(n for n, _ in sizes), 1)
