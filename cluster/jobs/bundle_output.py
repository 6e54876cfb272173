"""Reward bundles written whole (`troupe rm train`): a stage fills a tmp folder beside rm.output and swaps it in
(cluster/durability/atomic.py), so a bundle already at rm.output is replaced only by a complete new one, and an
interrupted save leaves the previous bundle (or its `.old` copy, which the next save renames back)."""

from __future__ import annotations

from pathlib import Path

import torch

from troupe.actors.reward.bundle import BundleInfo, save_bundle
from troupe.cluster.durability.atomic import fresh_tmp, swap_in


def not_a_bundle(out: str | Path) -> str | None:
    """Why `out` cannot be replaced by a bundle (it holds something else), or None."""
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not (out / "bundle.json").is_file():
        return (
            f"{out} exists and is not a reward bundle (no bundle.json): writing a bundle replaces its folder "
            "whole; give rm.output a new or empty folder"
        )
    return None


def write_bundle(out: str | Path, info: BundleInfo, tensors: dict[str, torch.Tensor]) -> Path:
    target, tmp = _start(out)
    save_bundle(tmp, info, tensors)
    swap_in(tmp, target)
    return Path(out)


def save_reward_head_bundle(
    group, out: str | Path, name: str, tokenizer_path: str, max_length: int, stats: dict
) -> Path:
    """BT / HaF: the learner group's trained body (`model/`) and its reward head, as one bundle."""
    from safetensors.torch import load_file

    target, tmp = _start(out)
    group.save_reward_model(str(tmp / "model"), tokenizer_path)
    head = load_file(str(tmp / "model" / "reward_head.safetensors"))
    info = BundleInfo(name, "model", max_length, [], reward_head=True, stats=stats)
    save_bundle(tmp, info, {"reward_head.weight": head["weight"], "reward_head.bias": head["bias"]})
    swap_in(tmp, target)
    return Path(out)


def _start(out: str | Path) -> tuple[Path, Path]:
    target = Path(out).expanduser().resolve()
    refused = not_a_bundle(target)
    if refused:
        raise FileExistsError(refused)
    return target, fresh_tmp(target)
