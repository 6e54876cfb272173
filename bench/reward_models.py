"""Reward-model benchmark on real public data with the SmolLM2-135M backbone: pairwise accuracy on fixed held-out
splits of hh-rlhf harmless-base and PandaLM for a Bradley-Terry baseline, ArmoRM (gating), ArmoRM + ALaRM
hierarchy and HaF-RM, plus each debiased objective's Spearman correlation with verbosity before and after.

Skips (exit 0, with the reason) when ../shared/data is absent. Features are cached under --out, so a rerun only
retrains heads; results.json is rewritten as each model finishes. `--ft-pairs 0` skips the fine-tuned BT and HaF.
Run: .venv/bin/python -m bench.reward_models [--hh-pairs 600] [--ft-pairs 192]
Smoke: .venv/bin/python -m bench.reward_models --smoke [--out FOLDER]: a small slice of the same data (120 rated
responses, 16 + 16 pairs, 8 fine-tuning pairs) on the tiny model's backbone, under FOLDER (temporary by default).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from bench.rm_data import DATA
from troupe.cluster.data.rm_data import hh_pairs, pandalm_pairs, ratings_rows, scales, split


def fine_tune(stage: str, backbone: str, train, out: Path, args) -> Path:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from troupe.cluster.config.compose import CONF_DIR
    from troupe.cluster.config.schema import register
    from troupe.cluster.jobs.reward_model import train_bt_or_haf

    register()  # the structured schema the config's defaults name (troupe_schema)

    overrides = [
        "job=rm_train",
        f"rm.stage={stage}",
        f"rm.name={stage}",
        f"rm.backbone={backbone}",
        f"rm.output={out}",
        f"rm.max_length={args.max_length}",
        "rm.epochs=2",
        "dataset.path=unused",
        "dataset.pairs_per_iteration=32",
        "learner.lr=5e-5",
        "learner.micro_batch_size=4",
        "learner.mini_batches=4",  # 4 optimizer steps per 32-pair call: 16 per epoch on 128 pairs
        "learner.world_size=2",
        "ray.num_cpus=2",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=overrides))
    folder, stats = train_bt_or_haf(cfg, train)
    print(f"  {stage}: loss {stats['first']['loss']:.3f} -> {stats['last']['loss']:.3f}", flush=True)
    return folder


class Results:
    """results.json, rewritten as each model finishes, so an interrupted run keeps every finished model."""

    def __init__(self, path: Path) -> None:
        self.path, self.models, self.extra = path, {}, {}

    def add(self, name: str, report: dict) -> None:
        self.models[name] = report
        print(f"  {name}: accuracy {report['accuracy']:.3f}", flush=True)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"results": self.models, **self.extra}, indent=2, default=str))
        tmp.replace(self.path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hh-pairs", type=int, default=300)
    parser.add_argument("--panda-pairs", type=int, default=400)
    parser.add_argument(
        "--max-ratings", type=int, default=1000, help="a random subset of the rated responses"
    )
    parser.add_argument(
        "--ft-pairs", type=int, default=128, help="train pairs for the fine-tuned BT and HaF (0: skip them)"
    )
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--gating-steps", type=int, default=1000)
    parser.add_argument("--min-consistency", type=float, default=0.55)
    parser.add_argument("--out", default="outputs/bench-rm")
    parser.add_argument("--backbone", default="builtin:smollm2-135m-instruct")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a small slice of the data on the tiny backbone (--out: temporary)",
    )
    args = parser.parse_args()
    if not DATA.exists():
        print(f"skipped: {DATA} is absent (the benchmark needs the shared public datasets)")
        return
    if args.smoke:
        from bench.troupe_run import SMOKE_MODEL, smoke_out

        args.out = str(smoke_out(None if args.out == parser.get_default("out") else args.out, "rm"))
        args.backbone, args.max_length, args.gating_steps = SMOKE_MODEL, 64, 20
        args.hh_pairs, args.panda_pairs, args.max_ratings, args.ft_pairs = 16, 16, 120, min(args.ft_pairs, 8)
    started = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = Results(out / "results.json")
    frozen = frozen_models(args, out, results)
    if args.ft_pairs > 0:
        fine_tuned_models(args, out, frozen["train"], frozen["test"], results)
    else:
        print("fine-tuned BT and HaF skipped (--ft-pairs 0)", flush=True)
    print_summary(args, frozen, results)
    print(f"\ntotal {time.perf_counter() - started:.0f}s; results: {results.path}")


def frozen_models(args, out: Path, results: Results) -> dict:
    """Stage 1, stage 2, the BT probe and the ALaRM variants on frozen SmolLM2 features (one shared cache)."""
    from troupe.actors.models import resolve_model
    from troupe.actors.reward.alarm import Normalizer, consistency_rates, hierarchical_reward, select_aspects
    from troupe.actors.reward.backbone import RewardBackbone
    from troupe.actors.reward.bundle import BundleHeads, load_bundle
    from troupe.cluster.data.ratings import load_ratings
    from troupe.cluster.jobs.rm_eval import pairwise_report
    from troupe.cluster.jobs.rm_training import bt_probe, pair_features, train_gating_stage, train_regression

    backbone_path = resolve_model(args.backbone)
    cache = out / "cache"
    rows, _ = ratings_rows(DATA)  # what it dropped: `troupe rm data ratings` prints it
    if args.max_ratings is not None:
        rows = random.Random(0).sample(rows, min(args.max_ratings, len(rows)))
    ratings_file = out / "ratings.jsonl"
    ratings_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ratings = load_ratings(str(ratings_file), scales(rows))
    stage1, s1 = train_regression(
        backbone_path, ratings, "armo", out / "stage1", cache, args.max_length, progress=True
    )
    print(
        f"stage 1: {len(rows)} rated responses, {len(ratings.objectives)} objectives; val MSE "
        + ", ".join(f"{k} {v:.3f}" for k, v in s1["val_mse"].items()),
        flush=True,
    )
    hh, hh_dropped = hh_pairs(DATA, args.hh_pairs)
    panda, pd_dropped = pandalm_pairs(DATA)
    pd_dropped["over_limit"] += max(0, len(panda) - args.panda_pairs)
    results.extra["dropped"] = {"hh-harmless": dict(hh_dropped), "pandalm": dict(pd_dropped)}
    print(f"pairs dropped by reason: {results.extra['dropped']}", flush=True)
    hh_train, hh_test = split(hh)
    pd_train, pd_test = split(panda[: args.panda_pairs])
    train, test = hh_train + pd_train, hh_test + pd_test
    random.Random(0).shuffle(train)
    stage2, s2 = train_gating_stage(
        stage1,
        train,
        out / "stage2",
        cache,
        verbosity="verbosity",
        steps=args.gating_steps,
        batch_size=512,
        progress=True,
        allow_chance=True,  # the benchmark reports a chance-level gate as a result (stage 2's stats say so)
    )
    print(
        f"stage 2: {len(train)} train pairs; BT loss {s2['bt_loss_first_last'][0]:.3f} -> "
        f"{s2['bt_loss_first_last'][1]:.3f}",
        flush=True,
    )
    results.extra |= {"stage1": s1, "stage2": s2}

    info, tensors = load_bundle(stage2)
    heads = BundleHeads(info, tensors)
    backbone = RewardBackbone(backbone_path, max_length=args.max_length)
    tp, tc, tr, _, _ = pair_features(backbone, train, cache)  # stage 2's features, from disk
    ep, ec, er, _, _ = pair_features(backbone, test, cache, progress=True)
    subsets = [p.subset for p in test]

    w = bt_probe(tc, tr)
    results.add("BT (linear probe, frozen)", pairwise_report(ec @ w, er @ w, subsets))
    test_c, test_r = heads.apply(ec, ep), heads.apply(er, ep)
    results.add("ArmoRM (gating)", pairwise_report(test_c["armo"], test_r["armo"], subsets))

    # ALaRM: a holistic reward z-normalised on the train responses; aspects = debiased ArmoRM objectives whose
    # pairwise ordering agrees with the holistic one on train pairs at least --min-consistency (the selection step).
    train_c, train_r = heads.apply(tc, tp), heads.apply(tr, tp)
    objectives = [k for k in train_c if k.startswith("armo/") and not k.endswith("/verbosity")]
    groups = list(range(len(train))) * 2
    kept = {}
    for label, h_train, h_c, h_r in (
        ("ArmoRM", torch.cat([train_c["armo"], train_r["armo"]]), test_c["armo"], test_r["armo"]),
        ("BT probe", torch.cat([tc @ w, tr @ w]), ec @ w, er @ w),
    ):
        rates = consistency_rates(
            h_train,
            {k: torch.cat([train_c[k], train_r[k]]) for k in objectives},
            n_pairs=len(train),
            groups=groups,
        )
        chosen_aspects = select_aspects(rates, args.min_consistency)
        kept[label] = (rates, chosen_aspects)
        norm = Normalizer().fit(h_train)
        weights = {k: 1.0 / max(1, len(chosen_aspects)) for k in chosen_aspects}
        hc, _ = hierarchical_reward(norm(h_c), {k: test_c[k] for k in chosen_aspects}, weights, threshold=0.0)
        hr, _ = hierarchical_reward(norm(h_r), {k: test_r[k] for k in chosen_aspects}, weights, threshold=0.0)
        results.extra["consistency"] = kept
        results.add(f"ALaRM (holistic {label} + aspects)", pairwise_report(hc, hr, subsets))
    return {"train": train, "test": test, "hh_test": hh_test, "pd_test": pd_test, "kept": kept, "s2": s2}


def fine_tuned_models(args, out: Path, train, test, results: Results) -> None:
    """BT and HaF fine-tuned on the DeepSpeed learner group, each saved to results as it finishes."""
    import ray

    from troupe.actors.models import resolve_model
    from troupe.actors.reward.bundle import BundleScorer
    from troupe.cluster.jobs.rm_eval import pairwise_report, score_pairs

    backbone_path = resolve_model(args.backbone)
    ft_train = train[: args.ft_pairs]
    subsets = [p.subset for p in test]
    ray.init(
        address="local", num_cpus=2, include_dashboard=False
    )  # a fresh local Ray, never a cluster found on the machine
    try:
        for stage, label in (
            ("bt", f"BT (fine-tuned, {len(ft_train)} pairs)"),
            ("haf", f"HaF-RM (fine-tuned, {len(ft_train)} pairs)"),
        ):
            folder = fine_tune(stage, backbone_path, ft_train, out / stage, args)
            c, r = score_pairs(BundleScorer(folder), test, stage)
            results.add(label, pairwise_report(c, r, subsets))
    finally:
        ray.shutdown()


def print_summary(args, frozen: dict, results: Results) -> None:
    print(
        f"\npairwise accuracy on held-out pairs (ties count as wrong): hh-harmless n={len(frozen['hh_test'])}, "
        f"PandaLM n={len(frozen['pd_test'])}; train pairs {len(frozen['train'])}"
    )
    print(f"{'model':<38} {'hh-harmless':>11} {'PandaLM':>8} {'all':>6}")
    for name, rep in results.models.items():
        sub = rep["subsets"]
        hh, pd = sub["hh-harmless"]["accuracy"], sub["pandalm"]["accuracy"]
        print(f"{name:<38} {hh:>11.3f} {pd:>8.3f} {rep['accuracy']:>6.3f}")
    for label, (rates, chosen_aspects) in frozen["kept"].items():
        ordered = sorted(rates.items(), key=lambda x: -x[1])
        print(
            f"\nALaRM aspects' agreement with the {label} ordering on train pairs (keep >= {args.min_consistency}):"
        )
        print("  " + ", ".join(f"{k.removeprefix('armo/')} {v:.2f}" for k, v in ordered))
        print(f"  kept: {[k.removeprefix('armo/') for k in chosen_aspects]}")
    print("\nSpearman correlation with verbosity on the train pairs' responses (threshold 0.03):")
    print(f"{'objective':<24} {'before':>7} {'after':>7} {'lambda':>7}")
    for name, d in frozen["s2"]["debias"].items():
        print(f"{name:<24} {d['corr_before']:>7.3f} {d['corr_after']:>7.3f} {d['lambda']:>7.3f}")


if __name__ == "__main__":
    sys.exit(main())
