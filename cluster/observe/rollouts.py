"""Every sample, inspectable: `<run dir>/rollouts.jsonl` holds one row per training sample (all of them, or the
share `logging.rollouts` of the prompt groups, chosen by prompt so a group stays whole), and
`troupe inspect <run dir>` prints the best and worst samples with their breakdown.

A row: iteration, prompt uid, sample index, prompt, response, objectives {name: value}, weights {name: value}
(aggregation weights, ArmoRM gates as gate/<name>), branch, reward (the scalar), advantage (its mean over the
response tokens, as the loss used it; null for DPO and for dropped samples), behaviour version, length (response
tokens), finish reason, and dropped (why it was left out of training, "" when kept). A resume or a rollback
forgets the rows of the iterations it redoes, as metrics.jsonl does.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from troupe.actors.protocol import ScoredRollout
from troupe.cluster.observe.metrics import MetricsWriter

FILE = "rollouts.jsonl"


def kept_prompt(uid: str, fraction: float) -> bool:
    """Whether a prompt's samples are logged: a stable hash of its uid against `fraction`, so the choice does not
    depend on the batch or on a resume."""
    if fraction >= 1.0:
        return True
    digest = hashlib.blake2b(uid.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def _number(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def sample_rows(
    iteration: int, scored: Sequence[ScoredRollout], advantages: Sequence[float] | None, fraction: float
) -> list[dict]:
    rows = []
    for i, s in enumerate(scored):
        r, reward = s.rollout, s.reward
        if not kept_prompt(r.prompt.uid, fraction):
            continue
        rows.append(
            {
                "iteration": iteration,
                "uid": r.prompt.uid,
                "sample": r.sample_index,
                "prompt": r.prompt.text,
                "response": r.response_text,
                "objectives": {k: _number(v) for k, v in reward.objectives.items()},
                "weights": {k: _number(v) for k, v in reward.weights.items()},
                "branch": reward.branch,
                "reward": _number(reward.scalar),
                "advantage": _number(advantages[i]) if advantages is not None else None,
                "behaviour_version": r.weight_version,
                "length": r.trained_tokens,
                "finish_reason": r.finish_reason,
                "dropped": reward.dropped,
            }
        )
        if r.conversation:  # a multi-turn trajectory: its turns, observations and environment counts
            rows[-1]["conversation"] = [{"role": role, "content": text} for role, text in r.conversation]
            rows[-1]["env"] = dict(r.env_counts)
    return rows


class RolloutLog:
    """Appends an iteration's sample rows (one fsync per iteration) and rewinds with the metrics."""

    def __init__(self, out_dir: Path, fraction: float) -> None:
        self.fraction = fraction
        self.writer = MetricsWriter(out_dir / FILE) if fraction > 0 else None

    def write(self, rows: list[dict]) -> None:
        if self.writer is not None and rows:
            self.writer.write_many(rows)

    def rewind(self, iteration: int) -> None:
        if self.writer is not None:
            self.writer.rewind(iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no sample log (a run writes it unless logging.rollouts=0; runs before troupe 0.2 have none)"
        )
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line
    return rows


def describe(row: dict, width: int) -> str:
    objectives = " ".join(
        f"{k}={v:.3g}" if v is not None else f"{k}=failed" for k, v in row["objectives"].items()
    )
    weights = " ".join(f"{k}={v:.3g}" for k, v in row["weights"].items() if v is not None)
    advantage = row.get("advantage")
    head = (
        f"reward {row['reward']:.4g}"
        if row.get("reward") is not None and not row.get("dropped")
        else "dropped"
    )
    lines = [
        f"[it {row['iteration']}] {row['uid']}#{row['sample']}  {head}  branch={row['branch']}  "
        f"advantage={'-' if advantage is None else f'{advantage:.3g}'}  length={row['length']} "
        f"({row['finish_reason']})  version={row['behaviour_version']}"
        + (f"  dropped: {row['dropped']}" if row.get("dropped") else ""),
        f"  objectives: {objectives}",
    ]
    if weights:
        lines.append(f"  weights: {weights}")
    for label, text in (("prompt", row["prompt"]), ("response", row["response"])):
        flat = " ".join(text.split())
        lines.append(f"  {label}: {flat[:width]}{'...' if len(flat) > width else ''}")
    return "\n".join(lines)


def inspect_run(run_dir: str, iteration: int | None = None, top: int = 3, width: int = 300) -> str:
    rows = read_rows(Path(run_dir))
    if iteration is not None:
        rows = [r for r in rows if r["iteration"] == iteration]
        if not rows:
            raise ValueError(f"{run_dir}: no samples logged for iteration {iteration}")
    kept = [r for r in rows if not r.get("dropped") and r.get("reward") is not None]
    ranked = sorted(kept, key=lambda r: r["reward"], reverse=True)
    scope = f"iteration {iteration}" if iteration is not None else "the whole run"
    iterations = sorted({r["iteration"] for r in rows})
    out = [
        f"{len(rows)} samples over {scope} ({len(iterations)} iterations logged), {len(rows) - len(kept)} dropped",
        "",
        f"== top {min(top, len(ranked))} by reward ==",
    ]
    out += [describe(r, width) for r in ranked[:top]]
    out += ["", f"== bottom {min(top, len(ranked))} by reward =="]
    out += [describe(r, width) for r in reversed(ranked[-top:])] if ranked else []
    dropped = [r for r in rows if r.get("dropped")]
    if dropped:
        out += ["", f"== dropped ({len(dropped)}; first {min(top, len(dropped))}) =="]
        out += [describe(r, width) for r in dropped[:top]]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    """`troupe inspect <run dir> [--iteration N] [--top K] [--width W]`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="troupe inspect",
        description="The best and worst samples of a run by reward, with each objective's value, the weights, the "
        "branch and the advantage (from <run dir>/rollouts.jsonl).",
    )
    parser.add_argument("run_dir")
    parser.add_argument("--iteration", type=int, default=None, help="one iteration (default: the whole run)")
    parser.add_argument("--top", type=int, default=3, help="samples at each end (default 3)")
    parser.add_argument("--width", type=int, default=300, help="characters of prompt and response shown")
    args = parser.parse_args(argv)
    try:
        print(inspect_run(args.run_dir, args.iteration, args.top, args.width))
    except (FileNotFoundError, ValueError) as e:
        print(f"troupe: error: {e}", file=sys.stderr)
        return 2
    return 0
