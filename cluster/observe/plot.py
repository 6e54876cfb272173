"""`troupe plot <run_dir>`: PNG charts of a run from its metrics.jsonl.

reward.png (reward and each objective), gating.png (ArmoRM gating weights, when served), eval.png (held-out
accuracy and reward), length_reward.png (response length against reward, and their correlation), timings.png
(phase times stacked per iteration). The x axis counts iterations trained (the evaluation before training is 0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PHASES = ("generate", "score", "learn", "sync", "eval")


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: `troupe plot` takes a run folder (run.output_dir)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} has no rows yet")
    return sorted(rows, key=lambda r: r.get("iteration", 0))


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and v == v:
            xs.append(r["iteration"] + 1)
            ys.append(v)
    return xs, ys


def _keys(rows: list[dict], prefix: str, exclude: tuple[str, ...] = ()) -> list[str]:
    keys = {k for r in rows for k in r if k.startswith(prefix) and not k.startswith(exclude)}
    return sorted(keys)


def plot_run(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    train = [r for r in rows if r["iteration"] >= 0]
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    def lines(ax, keys: list[str], strip: str, title: str, ylabel: str) -> None:
        for key in keys:
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=key.removeprefix(strip))
        ax.set(title=title, xlabel="iterations trained", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")

    objectives = _keys(train, "objective/", ("objective/gate/",))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    lines(top, ["reward/mean"], "", "reward (training samples)", "mean reward")
    lines(bottom, objectives, "objective/", "objectives", "mean value")
    save(fig, "reward.png")

    gates = _keys(train, "objective/gate/")
    if gates:
        fig, ax = plt.subplots(figsize=(8, 4))
        lines(ax, gates, "objective/gate/", "ArmoRM gating weights (mean over samples)", "weight")
        save(fig, "gating.png")

    accuracy = [k for k in _keys(rows, "eval/") if k.endswith(("/accuracy", "/reward/mean"))]
    if accuracy:
        fig, ax = plt.subplots(figsize=(8, 4))
        lines(ax, accuracy, "eval/", "held-out evaluation", "value")
        save(fig, "eval.png")

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    _, lengths = _series(train, "response_tokens/mean")
    its, rewards = _series(train, "reward/mean")
    if len(lengths) == len(rewards):
        points = left.scatter(lengths, rewards, c=its, cmap="viridis")
        fig.colorbar(points, ax=left, label="iteration")
    left.set(
        title="length against reward (per iteration)", xlabel="mean response tokens", ylabel="mean reward"
    )
    left.grid(alpha=0.3)
    lines(right, ["reward/length_corr"], "", "reward-length correlation within a batch", "Pearson r")
    save(fig, "length_reward.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    xs = [r["iteration"] + 1 for r in train]
    bottom_ = [0.0] * len(train)
    for phase in PHASES:
        heights = [float(r.get(f"time/{phase}") or 0.0) for r in train]
        if any(heights):
            ax.bar(xs, heights, bottom=bottom_, label=phase)
            bottom_ = [b + h for b, h in zip(bottom_, heights, strict=True)]
    ax.set(title="phase times per iteration", xlabel="iteration", ylabel="seconds")
    ax.legend(fontsize=8)
    save(fig, "timings.png")
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: troupe plot <run_dir>", file=sys.stderr)
        return 2
    for path in plot_run(argv[0]):
        print(path)
    return 0
