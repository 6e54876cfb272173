"""Pairwise accuracy of a reward model on preference pairs, RewardBench-style: per subset, then per section as
the example-weighted mean of its subsets, and the overall score as the mean of sections. Ties count as wrong."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def pairwise_report(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    subsets: Sequence[str],
    sections: Mapping[str, Sequence[str]] | None = None,
) -> dict:
    if chosen.shape != rejected.shape or len(subsets) != len(chosen):
        raise ValueError("chosen, rejected and subsets must have one entry per pair")
    correct = (chosen > rejected).float()  # a tie is wrong
    per_subset: dict[str, dict] = {}
    for name in sorted(set(subsets)):
        idx = torch.tensor([i for i, s in enumerate(subsets) if s == name])
        per_subset[name] = {"accuracy": float(correct[idx].mean()), "n": len(idx)}
    sections = dict(sections or {"all": sorted(per_subset)})
    per_section = {}
    for section, names in sections.items():
        unknown = sorted(set(names) - set(per_subset))
        if unknown:
            raise KeyError(f"section {section!r} names subsets with no pairs: {unknown}")
        n = sum(per_subset[s]["n"] for s in names)
        per_section[section] = sum(per_subset[s]["accuracy"] * per_subset[s]["n"] for s in names) / n
    return {
        "accuracy": float(correct.mean()),
        "ties": int((chosen == rejected).sum()),
        "pairs": len(chosen),
        "subsets": per_subset,
        "sections": per_section,
        "score": sum(per_section.values()) / len(per_section),
    }


def score_pairs(scorer, prefs, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of chosen and rejected responses under output `key` of a BundleScorer."""
    prompts = [p.prompt for p in prefs]
    chosen = scorer.score(prompts, [p.chosen for p in prefs])
    if key not in chosen:
        raise KeyError(f"reward output {key!r} not produced; outputs: {sorted(chosen)}")
    rejected = scorer.score(prompts, [p.rejected for p in prefs])
    return chosen[key], rejected[key]
