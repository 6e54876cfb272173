"""Pairwise accuracy of a reward model on preference pairs, RewardBench-style: per subset, per subset group (the part
of a `family/subset` name before "/"), per section as the example-weighted mean of its subsets, and the overall
score as the mean of sections. Ties count as wrong.

`evaluate_bundle` is `troupe rm eval`: features come from the shared feature cache (`rm.cache`), so other
bundles on the same backbone and other output keys (`rm.eval_key`) reuse them; it writes a JSON report (accuracies,
the Spearman correlation of reward with response length, pairs dropped by the loader and cut by the truncation
rule, the max_length used) and one JSONL row of scores per kept pair.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch


def _group(subset: str) -> str:
    return subset.split("/", 1)[0]


def pairwise_report(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    subsets: Sequence[str],
    sections: Mapping[str, Sequence[str]] | None = None,
) -> dict:
    """`sections` lists subset names or group names (a group stands for all its subsets)."""
    if chosen.shape != rejected.shape or len(subsets) != len(chosen):
        raise ValueError("chosen, rejected and subsets must have one entry per pair")
    correct = (chosen > rejected).float()  # a tie is wrong

    def accuracy_of(member) -> dict:
        idx = torch.tensor([i for i, s in enumerate(subsets) if member(s)])
        return {"accuracy": float(correct[idx].mean()), "n": len(idx)}

    per_subset = {name: accuracy_of(lambda s, n=name: s == n) for name in sorted(set(subsets))}
    groups = sorted({_group(s) for s in subsets})
    per_group = {g: accuracy_of(lambda s, g=g: _group(s) == g) for g in groups}
    sections = dict(sections or {"all": sorted(per_subset)})
    per_section = {}
    for section, names in sections.items():
        members = set()
        for name in names:
            members |= {name} if name in per_subset else {s for s in per_subset if _group(s) == name}
        unknown = sorted(n for n in names if n not in per_subset and n not in per_group)
        if unknown:
            raise KeyError(f"section {section!r} names subsets with no pairs: {unknown}")
        n = sum(per_subset[s]["n"] for s in members)
        per_section[section] = sum(per_subset[s]["accuracy"] * per_subset[s]["n"] for s in members) / n
    return {
        "accuracy": float(correct.mean()),
        "ties": int((chosen == rejected).sum()),
        "pairs": len(chosen),
        "subsets": per_subset,
        "groups": per_group,
        "sections": per_section,
        "score": sum(per_section.values()) / len(per_section),
    }


def score_pairs(scorer, prefs, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of chosen and rejected responses under output `key` of a BundleScorer (no cache)."""
    prompts = [p.prompt for p in prefs]
    chosen = scorer.score(prompts, [p.chosen for p in prefs])
    if key not in chosen:
        raise KeyError(f"reward output {key!r} not produced; outputs: {sorted(chosen)}")
    rejected = scorer.score(prompts, [p.rejected for p in prefs])
    return chosen[key], rejected[key]


def evaluate_bundle(cfg, out_dir: Path, prefs, dropped: Mapping[str, int]) -> dict:
    """`troupe rm eval`: score `prefs` with rm.bundle at rm.max_length (else the bundle's), write the report
    and the per-pair scores into `out_dir`, print a summary; returns the report."""
    from troupe.actors.reward.armo import spearman
    from troupe.actors.reward.backbone import RewardBackbone
    from troupe.actors.reward.bundle import BundleHeads, load_bundle
    from troupe.actors.reward.feature_cache import cached_features

    rm = cfg.rm
    if rm.sections is not None and not isinstance(rm.sections, Mapping):
        raise ValueError(
            f"rm.sections must map each section to a list of subsets or groups, got {rm.sections!r}"
        )
    info, tensors = load_bundle(rm.bundle, allow_failed=rm.allow_chance)
    heads = BundleHeads(info, tensors)
    max_length = rm.max_length if rm.max_length is not None else info.max_length
    key = rm.eval_key or info.name
    backbone = RewardBackbone(info.backbone, max_length=max_length)
    n = len(prefs)
    d = cfg.dataset
    sample = {
        "sample": d.sample,
        "seed": cfg.run.seed if d.sample == "random" else None,
        "max_pairs": d.max_pairs,
        "max_pairs_per_subset": d.max_pairs_per_subset,
        "subset_key": rm.subset_key,
    }
    print(
        f"rm_eval: {n} pairs ({_describe(sample)}), bundle {rm.bundle}, max_length {max_length}, cache {rm.cache}",
        flush=True,
    )
    responses = [p.chosen for p in prefs] + [p.rejected for p in prefs]
    feats = cached_features(
        backbone,
        [p.prompt for p in prefs] * 2,
        responses,
        rm.cache,
        progress=cfg.run.progress_bar,
        report=True,
    )
    outputs = heads.apply(feats.response, feats.prompt)
    if key not in outputs:
        raise KeyError(
            f"rm.eval_key: reward output {key!r} not produced by {rm.bundle}; outputs: {sorted(outputs)}"
        )
    chosen, rejected = outputs[key][:n], outputs[key][n:]
    cut = feats.cut[:n] | feats.cut[n:]
    subsets = [p.subset or "all" for p in prefs]
    sections = {k: list(v) for k, v in rm.sections.items()} if rm.sections else None
    report = pairwise_report(chosen, rejected, subsets, sections)
    lengths = torch.tensor(
        [len(ids) for ids in backbone.tokenizer(responses, add_special_tokens=False)["input_ids"]],
        dtype=torch.float32,
    )
    stem = f"rm_eval-{Path(rm.bundle).name}-{key.replace('/', '_')}"
    report |= {
        "bundle": str(rm.bundle),
        "key": key,
        "max_length": max_length,
        "max_length_from": "rm.max_length" if rm.max_length is not None else "bundle",
        # how much the reward follows length alone, over every scored response (chosen and rejected)
        "length_spearman": spearman(outputs[key], lengths) if n > 1 else None,
        "dropped": dict(dropped),
        "sample": sample,
        "cut": int(cut.sum()),
        "cache": feats.stats,
        "path": str(out_dir / f"{stem}.json"),
        "scores_path": str(out_dir / f"{stem}.pairs.jsonl"),
    }
    _write_pairs(Path(report["scores_path"]), prefs, subsets, chosen, rejected, cut)
    Path(report["path"]).write_text(json.dumps(report, indent=2))
    _print(report)
    return report


def _describe(sample: dict) -> str:
    if sample["max_pairs"] is None and sample["max_pairs_per_subset"] is None:
        return "all pairs"
    parts = [
        f"dataset.sample={sample['sample']}"
        + (f" seed {sample['seed']}" if sample["seed"] is not None else "")
    ]
    if sample["max_pairs_per_subset"] is not None:
        parts.append(f"at most {sample['max_pairs_per_subset']} per {sample['subset_key']}")
    if sample["max_pairs"] is not None:
        parts.append(f"at most {sample['max_pairs']} in all")
    return ", ".join(parts)


def _write_pairs(path: Path, prefs, subsets, chosen, rejected, cut) -> None:
    with path.open("w") as f:
        for i, p in enumerate(prefs):
            c, r = float(chosen[i]), float(rejected[i])
            row = {"pair": i, "source": p.source, "subset": subsets[i], "chosen": c, "rejected": r}
            f.write(json.dumps(row | {"correct": c > r, "cut": bool(cut[i])}) + "\n")


def _print(report: dict) -> None:
    print(
        f"pairwise accuracy ({report['key']}): {report['accuracy']:.4f} on {report['pairs']} pairs "
        f"(ties {report['ties']}, cut {report['cut']}, dropped {report['dropped'] or 0}, "
        f"max_length {report['max_length']} from {report['max_length_from']})"
    )
    for name, s in report["subsets"].items():
        print(f"  {name:<24} {s['accuracy']:.4f}  n={s['n']}")
    if any("/" in name for name in report["subsets"]):
        for name, s in report["groups"].items():
            print(f"  group {name:<18} {s['accuracy']:.4f}  n={s['n']}")
    for name, v in report["sections"].items():
        print(f"  section {name:<16} {v:.4f}")
    if report["length_spearman"] is not None:
        print(f"  Spearman(reward, response tokens) {report['length_spearman']:.3f}")
    print(f"per-pair scores: {report['scores_path']}", flush=True)  # the report's path: Job.finish prints it
