"""Non-finite values (inf, NaN) in what the run learns from, and `faults.on_nonfinite`.

Each kind is caught where it appears, left out, and counted in the iteration's row:
- a reward: `score_batch` (cluster/run/scoring.py) drops the sample's prompt group (`nonfinite_reward` in the
  accounting) before the aggregation sees it, or after, when the aggregation made it (`reward/nonfinite`);
- an advantage or return: the learner rank drops the prompt group from the update before whitening
  (actors/learner/pg_update.py), and the driver accounts it (`nonfinite_advantage`, `faults/nonfinite_advantages`);
- a loss or gradient: the optimizer step is not applied on any rank (actors/learner/rank.py; the policy's and the
  critic's together: `faults/nonfinite_updates`).
skip goes on; stop writes a checkpoint of the iteration (in which nothing non-finite was applied) and raises
`NonFiniteStop`. A metric that is NaN anyway is written as null and counted (`metrics/nonfinite`, run/job.py).
"""

from __future__ import annotations

ADVANTAGE_REASON = "nonfinite_advantage"

# row key -> what it counts, for the stop message
COUNTS = {
    "reward/nonfinite": "samples with an inf/NaN reward",
    "faults/nonfinite_advantages": "samples with an inf/NaN advantage",
    "faults/nonfinite_updates": "optimizer steps with an inf/NaN loss or gradient",
}


class NonFiniteStop(RuntimeError):
    """faults.on_nonfinite=stop: an iteration met inf/NaN values; a checkpoint of it was written."""


def learn_counts(scored, learn_stats: dict) -> dict:
    """The learn phase's counts for the row: samples left out for an inf/NaN advantage, steps not applied."""
    steps = learn_stats.get("train/nonfinite_steps", 0) + learn_stats.get("critic/nonfinite_steps", 0)
    return {
        "faults/nonfinite_advantages": sum(s.reward.dropped == ADVANTAGE_REASON for s in scored),
        "faults/nonfinite_updates": round(steps),
    }


def stop_reason(row: dict, policy: str) -> str | None:
    """What a `stop` policy stops for in this row, or None (nothing non-finite, or policy `skip`)."""
    found = [f"{row[key]} {what}" for key, what in COUNTS.items() if row.get(key)]
    return "; ".join(found) if found and policy == "stop" else None
