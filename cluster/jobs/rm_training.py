"""Reward-model training stages, as functions (the `troupe rm train` CLI and the bench call them):

  regression: ArmoRM stage 1 - ridge heads on frozen backbone features of rated responses
  gating:     ArmoRM stage 2 - verbosity debiasing + prompt-conditioned gate trained with Bradley-Terry; the
              bundle stores the transform M and lambda itself ((r M)_i = r_i - lambda_i r_v)
  bt / haf:   Bradley-Terry or HaF-RM on the DeepSpeed learner group (body + reward head [+ LM head])
Each writes a reward bundle (actors/reward/bundle.py) that reward shards load. The backbone stages take a compute
`dtype` (bfloat16 or float32); BT / HaF train in learner.dtype. `tokenize_for_rm` encodes exactly as serving does.
Every stage's stats say how many rows or pairs the truncation rule cut; `progress` shows tqdm bars on stderr.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from troupe.actors.learner.dpo import PreferencePair
from troupe.actors.reward import armo
from troupe.actors.reward.backbone import RewardBackbone, encode
from troupe.actors.reward.bundle import BundleInfo, load_bundle, save_bundle
from troupe.actors.reward.feature_cache import cached_features
from troupe.cluster.data.preferences import Preference
from troupe.cluster.data.ratings import Ratings

log = logging.getLogger("troupe.rm_training")


def train_regression(
    backbone_path: str,
    ratings: Ratings,
    name: str,
    out: str | Path,
    cache: str | Path,
    max_length: int = 512,
    val_fraction: float = 0.2,
    seed: int = 0,
    dtype: str = "float32",
    progress: bool = False,
) -> tuple[Path, dict]:
    backbone = RewardBackbone(backbone_path, dtype=dtype, max_length=max_length)
    feats = cached_features(backbone, ratings.prompts, ratings.responses, cache, progress=progress)
    w, alphas, mses, rows = armo.fit_objectives(
        feats.response, ratings.labels, val_fraction=val_fraction, seed=seed
    )
    stats = {
        "alpha": dict(zip(ratings.objectives, alphas.tolist(), strict=True)),
        "val_mse": dict(zip(ratings.objectives, mses.tolist(), strict=True)),
        "rows": dict(zip(ratings.objectives, rows.tolist(), strict=True)),
        "max_length": max_length,
        "data": {
            "rows": len(ratings.responses),
            "dropped": dict(ratings.skipped),
            "cut": feats.stats["rows_cut"],
        },
        "cache": feats.stats,
    }
    info = BundleInfo(name, backbone_path, max_length, list(ratings.objectives), stats={"regression": stats})
    k = len(ratings.objectives)
    return save_bundle(out, info, {"regression": w, "transform": torch.eye(k)}), stats


def pair_features(
    backbone: RewardBackbone, prefs: list[Preference], cache: str | Path, progress: bool = False
):
    """(prompt [P, d], chosen [P, d], rejected [P, d], cut [P] bool, cache stats) from one forward per response,
    cached; a pair counts as cut when either side was."""
    prompts = [p.prompt for p in prefs] * 2
    responses = [p.chosen for p in prefs] + [p.rejected for p in prefs]
    f = cached_features(backbone, prompts, responses, cache, progress=progress)
    n = len(prefs)
    return f.prompt[:n], f.response[:n], f.response[n:], f.cut[:n] | f.cut[n:], f.stats


@contextmanager
def step_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar advanced by every optimizer step taken inside the block (armo.train_gating owns its loop; a
    global post-step hook counts its steps without reaching into it)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="step", file=sys.stderr, disable=not enabled) as bar:
        handle = register_optimizer_step_post_hook(lambda *_: bar.update(1))
        try:
            yield bar
        finally:
            handle.remove()


def train_gating_stage(
    stage1: str | Path,
    prefs: list[Preference],
    out: str | Path,
    cache: str | Path,
    verbosity: str | None = None,
    threshold: float = 0.03,
    steps: int = 2000,
    lr: float = 1e-3,
    batch_size: int = 1024,
    hidden: int = 1024,
    n_hidden: int = 3,
    temperature: float = 10.0,
    dropout: float = 0.2,
    seed: int = 0,
    dtype: str = "float32",
    progress: bool = False,
) -> tuple[Path, dict]:
    """`dtype` (auto | bfloat16 | float32): the backbone's and the gate's compute dtype (features are float32)."""
    info, tensors = load_bundle(stage1)
    w = tensors["regression"]
    backbone = RewardBackbone(info.backbone, dtype=dtype, max_length=info.max_length)
    prompt, chosen, rejected, cut, cache_stats = pair_features(backbone, prefs, cache, progress)
    stats: dict = {
        "pairs": len(prefs),
        "cut": int(cut.sum()),
        "max_length": info.max_length,
        "cache": cache_stats,
    }
    transform = torch.eye(len(info.objectives))
    lam = torch.zeros(len(info.objectives))
    if verbosity is not None:
        if verbosity not in info.objectives:
            raise ValueError(f"verbosity objective {verbosity!r} is not among {info.objectives}")
        v = info.objectives.index(verbosity)
        pooled = (
            torch.cat([chosen, rejected]) @ w.T
        )  # the reference set: both sides of the pairs (code fallback)
        lam, before, after = armo.verbosity_penalties(pooled, v, threshold)
        transform = armo.transform_matrix(lam, v)
        stats["debias"] = {
            obj: {"lambda": float(lam[i]), "corr_before": float(before[i]), "corr_after": float(after[i])}
            for i, obj in enumerate(info.objectives)
        }
    with step_bar(steps, "gating", progress):
        gate, losses = armo.train_gating(
            prompt,
            chosen,
            rejected,
            w,
            transform,
            steps,
            lr,
            batch_size,
            hidden,
            n_hidden,
            temperature,
            dropout,
            seed,
            getattr(torch, backbone.dtype),
        )
    stats["bt_loss_first_last"] = (losses[0], losses[-1])
    if losses[-1] > 0.99 * math.log(2):  # chance level: the gate did not learn (it may have collapsed)
        log.warning(
            "gating: Bradley-Terry loss %.3f -> %.3f stayed at chance (log 2 = 0.693); try another "
            "run.seed, more pairs or another rm.gating_temperature",
            losses[0],
            losses[-1],
        )
    stats["logit_scale"] = float(gate.logit_scale.detach())
    new = BundleInfo(
        info.name,
        info.backbone,
        info.max_length,
        info.objectives,
        verbosity,
        {"hidden": hidden, "n_hidden": n_hidden, "temperature": temperature},
        stats=info.stats | {"gating": stats},
    )
    # lambda itself ((r M)_i = r_i - lambda_i r_v); zeros when there is no verbosity objective
    heads = {"regression": w, "transform": transform, "lambda": lam}
    heads |= {f"gating.{k}": t for k, t in gate.state_dict().items()}
    return save_bundle(out, new, heads), stats


def tokenize_for_rm(prefs: list[Preference], tokenizer, max_length: int) -> tuple[list[PreferencePair], int]:
    """(pairs, how many were cut) in the encoding reward shards score with (`actors.reward.backbone.encode`: chat
    template, read at the assistant turn's end-of-turn token, one truncation rule), so training sees exactly the
    ids serving scores."""
    pairs, cut = [], 0
    for p in prefs:
        c = encode(tokenizer, p.prompt, p.chosen, max_length)
        r = encode(tokenizer, p.prompt, p.rejected, max_length)
        head = c.input_ids[: c.response_start]
        if r.input_ids[: r.response_start] != head:
            raise ValueError(
                f"{p.source}: the chat template renders this prompt differently for the two responses"
            )
        pairs.append(PreferencePair(head, c.input_ids[c.response_start :], r.input_ids[r.response_start :]))
        cut += c.cut or r.cut
    return pairs, cut


def train_reward_head(
    group, pairs: list[PreferencePair], epochs: int, per_call: int, rng, record=None
) -> list[dict]:
    """Bradley-Terry / HaF epochs over `pairs` on a LearnerGroup of RewardTrainer ranks; `record` gets each row."""
    from troupe.cluster.run.learn import pad_to_multiple

    history = []
    world = len(group.ranks)
    for epoch in range(epochs):
        order = pairs[:]
        rng.shuffle(order)
        for lo in range(0, len(order), per_call):
            chunk = pad_to_multiple(order[lo : lo + per_call], world, rng)
            history.append(group.train_pairs(chunk))
            if record is not None:
                row = {"iteration": len(history) - 1, "epoch": epoch}
                record(row | {f"train/{k}": v for k, v in history[-1].items()})
    return history


def save_reward_head_bundle(
    group, out: str | Path, name: str, tokenizer_path: str, max_length: int, stats: dict
) -> Path:
    out = Path(out)
    body = out / "model"
    shutil.rmtree(body, ignore_errors=True)
    group.save_reward_model(str(body), tokenizer_path)
    from safetensors.torch import load_file

    head = load_file(str(body / "reward_head.safetensors"))
    info = BundleInfo(name, "model", max_length, [], reward_head=True, stats=stats)
    return save_bundle(out, info, {"reward_head.weight": head["weight"], "reward_head.bias": head["bias"]})
