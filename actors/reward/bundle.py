"""A saved reward model that reward shards load: backbone reference + heads in safetensors + a JSON description.

Layout of a bundle folder:
  bundle.json        name, backbone (path; relative paths are inside the bundle), max_length, objectives,
                     verbosity objective, gating config, whether a scalar reward head exists, fit statistics,
                     normalizers {output key: holistic Normalizer.state_dict()} (`store_normalizer`), so an ALaRM
                     hierarchy serving this bundle z-normalises with the statistics it was used with, and `failed`
                     (why training failed, e.g. a loss at chance): such a bundle is kept for inspection only and
                     `read_info` / `load_bundle` refuse it unless called with allow_failed=True
  heads.safetensors  regression [K, d] (ArmoRM stage 1), transform [K, K] M and lambda [K] (debiasing:
                     (r M)_i = r_i - lambda_i r_v), gating.* (stage 2), reward_head.weight/bias (BT / HaF)
One backbone forward serves every head: `BundleScorer.score` returns all of them from the same features. The
backbone runs in bfloat16 or float32 (`dtype`); features and heads are float32.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from troupe.actors.reward.armo import GatingNetwork, armo_score


@dataclass
class BundleInfo:
    name: str
    backbone: str
    max_length: int = 512
    objectives: list[str] = field(default_factory=list)
    verbosity: str | None = None
    gating: dict | None = None  # {"hidden", "n_hidden", "temperature"}
    reward_head: bool = False
    stats: dict = field(default_factory=dict)  # how it was fitted (alphas, MSE, lambdas, correlations, ...)
    normalizers: dict = field(default_factory=dict)  # {output key: Normalizer.state_dict()} for ALaRM
    failed: str | None = None  # why training failed (serving refuses the bundle); None: a usable bundle


def output_names(info: BundleInfo) -> set[str]:
    """Every objective key the heads of a bundle may output (BundleHeads.apply), from bundle.json alone."""
    per_objective = {f"{info.name}/{o}" for o in info.objectives} | {f"gate/{o}" for o in info.objectives}
    return {info.name, f"{info.name}/reward_head"} | per_objective


class FailedBundle(ValueError):
    """A bundle whose training failed (bundle.json "failed"): refused for serving and scoring."""


def read_info(folder: str | Path, allow_failed: bool = False) -> BundleInfo:
    """bundle.json only (no tensors). A bundle marked failed raises FailedBundle unless `allow_failed`."""
    meta = Path(folder) / "bundle.json"
    if not meta.exists():
        old = Path(folder).with_name(Path(folder).name + ".old")  # a save interrupted between its two renames
        hint = (
            f"; {old} holds the previous bundle: `mv {old} {folder}`"
            if (old / "bundle.json").is_file()
            else ""
        )
        raise FileNotFoundError(f"{folder} is not a reward bundle (no bundle.json){hint}")
    info = parse_info(meta)
    if info.failed and not allow_failed:
        raise FailedBundle(
            f"reward bundle {folder} is marked failed and is not served: {info.failed}. It was kept for "
            f"inspection only (bundle.json 'failed', 'stats'); retrain it, or retrain with rm.allow_chance=true "
            f"to accept a chance-level model"
        )
    return info


def parse_info(meta: Path) -> BundleInfo:
    """bundle.json as a BundleInfo; malformed JSON, a missing or unknown key and a value of the wrong type raise
    naming the file and the key."""
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta}: not a valid bundle description ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{meta}: must hold a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(BundleInfo)
    known = {f.name: f for f in fields(BundleInfo)}
    if unknown := sorted(set(data) - set(known)):
        raise ValueError(f"{meta}: unknown key(s) {unknown}; a bundle has {sorted(known)}")
    for name, f in known.items():
        if name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ValueError(f"{meta}: missing key {name!r}")
            continue
        allowed = _runtime_types(hints[name])
        value = data[name]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            said = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise ValueError(f"{meta}: {name!r} must be {said}, got {type(value).__name__} {value!r:.80}")
    return BundleInfo(**data)


def _runtime_types(hint) -> tuple[type, ...]:
    """str | None -> (str, NoneType); list[str] -> (list,)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(t for arg in typing.get_args(hint) for t in _runtime_types(arg))
    return (typing.get_origin(hint) or hint,)


def store_normalizer(folder: str | Path, key: str, state: dict) -> Path:
    """Record holistic-normaliser statistics (`Normalizer.state_dict()`) for output `key` in bundle.json."""
    meta = Path(folder) / "bundle.json"
    info = read_info(folder, allow_failed=True)
    info.normalizers[key] = dict(state)
    tmp = meta.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(info), indent=2, default=float))
    tmp.replace(meta)
    return meta


def save_bundle(folder: str | Path, info: BundleInfo, tensors: dict[str, torch.Tensor]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().float().contiguous() for k, v in tensors.items()}, str(folder / "heads.safetensors")
    )
    (folder / "bundle.json").write_text(json.dumps(asdict(info), indent=2, default=float))
    return folder


def load_bundle(folder: str | Path, allow_failed: bool = False) -> tuple[BundleInfo, dict[str, torch.Tensor]]:
    folder = Path(folder)
    info = read_info(folder, allow_failed)
    if not Path(info.backbone).is_absolute() and (folder / info.backbone).exists():
        info.backbone = str((folder / info.backbone).resolve())
    return info, load_file(str(folder / "heads.safetensors"))


class BundleHeads:
    """The heads of a bundle applied to backbone features (no backbone here: testable, and shared by shards)."""

    def __init__(self, info: BundleInfo, tensors: dict[str, torch.Tensor]) -> None:
        self.info = info
        self.regression = tensors.get("regression")
        if self.regression is not None and self.regression.shape[0] != len(info.objectives):
            raise ValueError(
                f"bundle {info.name}: regression has {self.regression.shape[0]} rows for {len(info.objectives)} objectives"
            )
        k = len(info.objectives)
        self.transform = tensors.get("transform", torch.eye(k) if k else None)
        self.gate = None
        if info.gating is not None:
            g = info.gating
            self.gate = GatingNetwork(
                self.regression.shape[1], k, g["hidden"], g["n_hidden"], g["temperature"], 0.0
            )
            self.gate.load_state_dict(
                {n.removeprefix("gating."): t for n, t in tensors.items() if n.startswith("gating.")}
            )
            self.gate.eval()
        self.head_w = tensors.get("reward_head.weight")
        self.head_b = tensors.get("reward_head.bias")

    @torch.no_grad()
    def apply(self, response: torch.Tensor, prompt: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every head's outputs, float32, from features [N, d] in any dtype."""
        name, out = self.info.name, {}
        response, prompt = response.float(), prompt.float()
        if self.regression is not None:
            debiased = (response @ self.regression.T) @ self.transform
            for i, obj in enumerate(self.info.objectives):
                out[f"{name}/{obj}"] = debiased[:, i]
            if self.gate is not None:
                gate = self.gate(prompt)
                out[name] = armo_score(response @ self.regression.T, self.transform, gate)
                for i, obj in enumerate(self.info.objectives):
                    out[f"gate/{obj}"] = gate[:, i]
        if self.head_w is not None:
            key = name if name not in out else f"{name}/reward_head"
            out[key] = (response @ self.head_w.T).squeeze(-1) + self.head_b
        return out


class BundleScorer:
    """Backbone + heads: scores (prompt messages, response) pairs with one forward pass for all heads."""

    def __init__(self, folder: str | Path, batch_size: int = 8, dtype: str = "float32") -> None:
        from troupe.actors.reward.backbone import RewardBackbone

        info, tensors = load_bundle(folder)
        self.heads = BundleHeads(info, tensors)
        self.backbone = RewardBackbone(info.backbone, dtype=dtype, max_length=info.max_length)
        self.batch_size = batch_size

    def score(self, prompts: Sequence[Sequence[dict]], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        response, prompt = self.backbone.features(prompts, responses, self.batch_size)
        return self.heads.apply(response, prompt)
