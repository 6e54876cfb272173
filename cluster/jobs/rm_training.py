"""Reward-model training stages, as functions (the `troupe rm train` CLI and the bench call them):

  regression: ArmoRM stage 1 - ridge heads on frozen backbone features of rated responses
  gating:     ArmoRM stage 2 - verbosity debiasing + prompt-conditioned gate trained with Bradley-Terry; the
              bundle stores the transform M and lambda itself ((r M)_i = r_i - lambda_i r_v)
  probe:      a Bradley-Terry linear head on frozen backbone features of the response (`bt_probe`), on the same
              feature cache; the bundle is a reward head on the unchanged backbone
  bt / haf:   Bradley-Terry or HaF-RM on the DeepSpeed learner group (body + reward head [+ LM head])
Each writes a reward bundle (actors/reward/bundle.py) that reward shards load, swapped in whole
(cluster/jobs/bundle_output.py). A Bradley-Terry loss that ends at chance (log 2) fails the gating and probe
stages (`ChanceLevel`; the bundle is written marked failed, which serving refuses) unless `allow_chance`. Every stage warns on stderr when the truncation rule cut rows or pairs. The backbone stages take a compute
`dtype` (bfloat16 or float32); BT / HaF train in learner.dtype. `tokenize_for_rm` encodes exactly as serving does.
Every stage's stats say how many rows or pairs the truncation rule cut; `progress` shows tqdm bars on stderr.
"""

from __future__ import annotations

import logging
import math
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from troupe.actors.learner.dpo import PreferencePair
from troupe.actors.reward import armo
from troupe.actors.reward.backbone import RewardBackbone, encode
from troupe.actors.reward.bundle import BundleInfo, load_bundle
from troupe.actors.reward.feature_cache import cached_features
from troupe.cluster.data.preferences import Preference
from troupe.cluster.data.ratings import Ratings
from troupe.cluster.jobs.bundle_output import write_bundle

log = logging.getLogger("troupe.rm_training")
CHANCE = math.log(2)  # the Bradley-Terry loss of a model that cannot tell chosen from rejected


class ChanceLevel(RuntimeError):
    """A Bradley-Terry stage whose loss stayed at chance; `folder` holds the bundle, marked failed."""

    def __init__(self, message: str, folder: Path) -> None:
        super().__init__(message)
        self.folder = folder


def at_chance(losses) -> bool:
    """The loss over the last tenth of training (at least one step) is within 1% of log 2, or above it."""
    tail = list(losses)[-max(1, len(losses) // 10) :]
    return sum(tail) / len(tail) > 0.99 * CHANCE


def warn_cut(cut: int, total: int, what: str, max_length: int, advice: str | None = None) -> None:
    """The truncation rule cut `cut` of `total` rows or pairs: say so on stderr."""
    if not cut:
        return
    advice = advice or f"raise rm.max_length (now {max_length}) to keep more of each prompt and response"
    message = (
        f"warning: the truncation rule cut {cut} of {total} {what} ({100 * cut / max(1, total):.0f}%) to "
        f"max_length {max_length}; {advice}"
    )
    print(message, file=sys.stderr, flush=True)


def _fail_at_chance(folder: Path, info: BundleInfo, tensors: dict, stage: str, first: float, last: float,
                    advice: str) -> ChanceLevel:  # fmt: skip
    message = (
        f"{stage}: the Bradley-Terry loss stayed at chance or above ({first:.3f} -> {last:.3f}; log 2 = {CHANCE:.3f}): the "
        f"model does not rank chosen over rejected responses. Try {advice}. The bundle in {folder} is marked "
        f"failed (serving refuses it); rm.allow_chance=true keeps a chance-level bundle as a usable one"
    )
    info.failed = message
    write_bundle(folder, info, tensors)
    return ChanceLevel(message, Path(folder))


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
    report: bool = False,
) -> tuple[Path, dict]:
    backbone = RewardBackbone(backbone_path, dtype=dtype, max_length=max_length)
    feats = cached_features(
        backbone, ratings.prompts, ratings.responses, cache, progress=progress, report=report
    )
    warn_cut(feats.stats["rows_cut"], len(ratings.responses), "rated responses", max_length)
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
    return write_bundle(out, info, {"regression": w, "transform": torch.eye(k)}), stats


def pair_features(
    backbone: RewardBackbone,
    prefs: list[Preference],
    cache: str | Path,
    progress: bool = False,
    report: bool = False,
):
    """(prompt [P, d], chosen [P, d], rejected [P, d], cut [P] bool, cache stats) from one forward per response,
    cached; a pair counts as cut when either side was."""
    prompts = [p.prompt for p in prefs] * 2
    responses = [p.chosen for p in prefs] + [p.rejected for p in prefs]
    f = cached_features(backbone, prompts, responses, cache, progress=progress, report=report)
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
    report: bool = False,
    allow_chance: bool = False,
    checkpoints=None,
) -> tuple[Path, dict]:
    """`dtype` (auto | bfloat16 | float32): the backbone's and the gate's compute dtype (features are float32).
    A Bradley-Terry loss at chance raises ChanceLevel (the bundle is written marked failed) unless
    `allow_chance`. `checkpoints`: cluster/jobs/gating_checkpoints.py (periodic checkpoints, resume)."""
    info, tensors = load_bundle(stage1)
    w = tensors["regression"]
    backbone = RewardBackbone(info.backbone, dtype=dtype, max_length=info.max_length)
    prompt, chosen, rejected, cut, cache_stats = pair_features(backbone, prefs, cache, progress, report)
    warn_cut(
        int(cut.sum()),
        len(prefs),
        "pairs (either side)",
        info.max_length,
        f"the gate reads features at stage 1's max_length ({info.max_length}): retrain stage 1 with a larger "
        "rm.max_length",
    )
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
            checkpoints,
        )
    stats["bt_loss_first_last"] = (losses[0], losses[-1])
    chance = at_chance(losses)  # the gate did not learn (it may have collapsed)
    stats["at_chance"] = chance
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
    if chance and not allow_chance:
        raise _fail_at_chance(
            Path(out),
            new,
            heads,
            "stage 2 (gating)",
            losses[0],
            losses[-1],
            "another run.seed, more pairs, a lower rm.gating_temperature (now "
            f"{temperature:g}) or rm.gating_lr (now {lr:g}), more rm.gating_steps (now {steps}); check that stage 1's "
            "objectives tell the pairs apart (troupe rm eval rm.bundle=<stage 1> rm.eval_key=<name>/<objective>), "
            "or compare with rm.stage=probe",
        )
    if chance:
        log.warning(
            "gating: Bradley-Terry loss %.3f -> %.3f at chance, kept (allow_chance)", losses[0], losses[-1]
        )
    return write_bundle(out, new, heads), stats


def bt_probe(
    chosen: torch.Tensor, rejected: torch.Tensor, l2: float = 1e-3, steps: int = 500
) -> torch.Tensor:
    """Bradley-Terry linear head on frozen features: argmin -log s(w.(h_w - h_l)) + l2 |w|^2."""
    diff = chosen - rejected
    w = torch.zeros(diff.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -torch.nn.functional.logsigmoid(diff @ w).mean() + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def train_probe_stage(
    backbone_path: str,
    prefs: list[Preference],
    name: str,
    out: str | Path,
    cache: str | Path,
    max_length: int = 512,
    l2: float = 1e-3,
    steps: int = 500,
    dtype: str = "float32",
    progress: bool = False,
    report: bool = False,
    allow_chance: bool = False,
) -> tuple[Path, dict]:
    """The frozen Bradley-Terry linear probe (`bt_probe` on the response features of both sides of each pair,
    from the shared feature cache) as a bundle: a scalar reward head served under `name` on the frozen backbone.
    A loss at chance raises ChanceLevel (the bundle is written marked failed) unless `allow_chance`."""
    backbone = RewardBackbone(backbone_path, dtype=dtype, max_length=max_length)
    _, chosen, rejected, cut, cache_stats = pair_features(backbone, prefs, cache, progress, report)
    warn_cut(int(cut.sum()), len(prefs), "pairs (either side)", max_length)
    held_out = _probe_held_out(chosen, rejected, l2, steps)
    w = bt_probe(chosen, rejected, l2, steps)  # the bundle's head: fit on every pair
    margin = (chosen - rejected) @ w
    last = float(-torch.nn.functional.logsigmoid(margin).mean())
    stats = {
        "pairs": len(prefs),
        "cut": int(cut.sum()),
        "max_length": max_length,
        "l2": l2,
        "steps": steps,
        "bt_loss_first_last": (CHANCE, last),  # w = 0 scores every pair at chance
        "train_accuracy": float((margin > 0).float().mean()),
        "held_out": held_out,
        "cache": cache_stats,
    }
    info = BundleInfo(name, backbone_path, max_length, [], reward_head=True, stats={"probe": stats})
    heads = {"reward_head.weight": w[None, :], "reward_head.bias": torch.zeros(1)}
    # A linear head on wide features fits a few hundred pairs of noise: judge it on pairs it did not see, by how
    # many it ranks right (a confident probe can rank most right with a held-out loss above log 2).
    if held_out:
        stats["at_chance"] = held_out["accuracy"] <= held_out["coin_max"]
        judged, stage = (
            held_out["bt_loss"],
            (
                f"probe (5-fold held-out: {100 * held_out['accuracy']:.0f}% of {held_out['pairs']} pairs ranked right, "
                f"a coin reaches {100 * held_out['coin_max']:.0f}%)"
            ),
        )
        advice = (
            f"a larger rm.probe_l2 (now {l2:g}; the training loss is {last:.3f}), more pairs, a larger rm.max_length "
            f"(now {max_length}) or another rm.backbone"
        )
    else:
        stats["at_chance"] = last > 0.99 * CHANCE
        judged, stage = last, "probe"
        advice = (
            f"more pairs, a smaller rm.probe_l2 (now {l2:g}), a larger rm.max_length (now {max_length}) or "
            "another rm.backbone"
        )
    if stats["at_chance"] and not allow_chance:
        raise _fail_at_chance(Path(out), info, heads, stage, CHANCE, judged, advice)
    return write_bundle(out, info, heads), stats


PROBE_HELD_OUT_MIN_PAIRS = 50  # below this a held-out estimate is noise; the training loss is judged instead
PROBE_FOLDS = 5


def _probe_held_out(chosen: torch.Tensor, rejected: torch.Tensor, l2: float, steps: int) -> dict | None:
    """5-fold cross-validation: each pair scored by a probe fit on the other four fifths. {"pairs", "bt_loss",
    "accuracy", "coin_max"} over all pairs; coin_max: the accuracy a coin reaches with 5% chance on that many."""
    n = chosen.shape[0]
    if n < PROBE_HELD_OUT_MIN_PAIRS:
        return None
    fold = torch.arange(n) % PROBE_FOLDS
    margin = torch.empty(n)
    for k in range(PROBE_FOLDS):
        held = fold == k
        w = bt_probe(chosen[~held], rejected[~held], l2, steps)
        margin[held] = (chosen[held] - rejected[held]) @ w
    return {
        "pairs": n,
        "bt_loss": float(-torch.nn.functional.logsigmoid(margin).mean()),
        "accuracy": float((margin > 0).float().mean()),
        "coin_max": 0.5 + 1.645 * 0.5 / n**0.5,  # one-sided 5% (normal approximation to the binomial)
    }


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
    group, pairs: list[PreferencePair], passes, record=None, checkpoints=None
) -> list[dict]:
    """Bradley-Terry / HaF steps over `pairs` on a LearnerGroup of RewardTrainer ranks, from `passes`' position
    (cluster/jobs/pair_passes.py); `record` gets each row, `checkpoints` (PairCheckpoints) saves when due."""
    history = []
    for epoch, step, chunk in passes:
        history.append(group.train_pairs([pairs[i] for i in chunk]))
        if record is not None:
            record({"iteration": step, "epoch": epoch} | {f"train/{k}": v for k, v in history[-1].items()})
        if checkpoints is not None and checkpoints.due(step):
            checkpoints.save(group, passes, step, {"first": history[0], "last": history[-1]})
    return history
