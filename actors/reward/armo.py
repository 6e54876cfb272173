"""ArmoRM (Wang et al. 2024): multi-objective regression on frozen features (stage 1), then a prompt-conditioned
gate with verbosity debiasing trained with Bradley-Terry (stage 2).

Score: R(x, y) = sum_i g_i(x) * (r M)_i with r = W h(x, y), M the debiasing transform, g = s * softmax(z / T).
Both bugs of the public stage-2 script are avoided: the softmax runs over the objective axis (issue #54 of
RLHF-Reward-Modeling normalised over chosen/rejected), and M is applied in training, not only at inference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

ALPHAS = tuple(10.0**k for k in range(-4, 5))
PENALTY_GRID = (
    0.0,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.125,
    0.15,
    0.2,
    0.25,
    0.3,
    0.35,
    0.4,
    0.45,
    0.5,
    0.55,
    0.6,
    0.65,
    0.7,
    0.75,
    0.8,
    0.85,
    0.9,
    0.95,
)


def rescale(values: Sequence[float | None], lo: float, hi: float, objective: str, where: Sequence[str] = ()):
    """Ratings on [lo, hi] to [0, 1]; None/NaN stays missing. A rating outside its scale is an error naming it."""
    out = []
    for i, v in enumerate(values):
        if v is None or v != v:
            out.append(float("nan"))
            continue
        if not lo <= v <= hi:
            src = where[i] if i < len(where) else f"row {i}"
            raise ValueError(f"{src}: objective {objective!r} rating {v} is outside its scale [{lo}, {hi}]")
        out.append((v - lo) / (hi - lo))
    return torch.tensor(out, dtype=torch.float32)


def ridge(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """argmin_w ||x w - y||^2 + alpha ||w||^2 (no intercept): w = (x'x + alpha I)^-1 x'y, in float64."""
    x64, y64 = x.double(), y.double()
    gram = x64.T @ x64 + alpha * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.solve(gram, x64.T @ y64).float()


def fit_objectives(features: torch.Tensor, labels: torch.Tensor, alphas=ALPHAS, val_fraction=0.2, seed=0):
    """Per-objective ridge on the rows where that objective is labelled; alpha chosen by validation MSE.

    labels [N, K] with NaN for missing. Returns (W [K, d], chosen alphas [K], validation MSE [K], rows [K]).
    The final fit uses train + validation rows.
    """
    n_obj = labels.shape[1]
    weights, chosen, mses, counts = [], [], [], []
    gen = torch.Generator().manual_seed(seed)
    for k in range(n_obj):
        rows = torch.nonzero(~torch.isnan(labels[:, k])).squeeze(1)
        if len(rows) < 5:
            raise ValueError(f"objective {k} has {len(rows)} labelled rows; ridge needs at least 5")
        rows = rows[torch.randperm(len(rows), generator=gen)]
        n_val = max(1, int(len(rows) * val_fraction))
        val, train = rows[:n_val], rows[n_val:]
        x, y = features[train], labels[train, k]
        scored = [
            (float(((features[val] @ ridge(x, y, a)) - labels[val, k]).pow(2).mean()), a) for a in alphas
        ]
        mse, alpha = min(scored)
        weights.append(ridge(features[rows], labels[rows, k], alpha))
        chosen.append(alpha)
        mses.append(mse)
        counts.append(len(rows))
    return torch.stack(weights), torch.tensor(chosen), torch.tensor(mses), torch.tensor(counts)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom > 0 else 0.0


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean of their positions)."""
    x = x.double()
    order = torch.argsort(x)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    values, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]


def verbosity_penalties(rewards: torch.Tensor, verbosity: int, threshold: float = 0.03, grid=PENALTY_GRID):
    """lambda_i: the first grid value where Spearman(r_i - lambda r_v, r_v) <= threshold, else 1.0 (as the code).

    rewards [N, K] predicted on a reference set. Returns (lambda [K], corr before [K], corr after [K]).
    """
    n_obj = rewards.shape[1]
    rv = rewards[:, verbosity]
    lam = torch.ones(n_obj)
    before = torch.tensor([spearman(rewards[:, i], rv) for i in range(n_obj)])
    for i in range(n_obj):
        if i == verbosity:
            continue
        for value in grid:
            if spearman(rewards[:, i] - value * rv, rv) <= threshold:
                lam[i] = value
                break
    after = torch.tensor(
        [0.0 if i == verbosity else spearman(rewards[:, i] - lam[i] * rv, rv) for i in range(n_obj)]
    )
    return lam, before, after


def transform_matrix(lam: torch.Tensor, verbosity: int | None) -> torch.Tensor:
    """M = I with row v replaced by e_v - lambda (lambda_v = 1), so (r M)_i = r_i - lambda_i r_v and (r M)_v = 0."""
    m = torch.eye(len(lam))
    if verbosity is not None:
        m[verbosity] = -lam
        m[verbosity, verbosity] = 1.0 - lam[verbosity]
    return m


class GatingNetwork(nn.Module):
    """g(x) = s * softmax(MLP(x) / T) over objectives; s (logit_scale) is learned, T fixed."""

    def __init__(
        self,
        in_dim: int,
        n_objectives: int,
        hidden: int = 1024,
        n_hidden: int = 3,
        temperature: float = 10.0,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(n_hidden):
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, n_objectives))
        self.layers = nn.Sequential(*layers)
        self.temperature = temperature
        self.logit_scale = nn.Parameter(torch.ones(1))

    def forward(self, prompt_features: torch.Tensor) -> torch.Tensor:
        logits = self.layers(prompt_features)
        return self.logit_scale * F.softmax(logits / self.temperature, dim=-1)  # the objective axis


def armo_score(objective_rewards: torch.Tensor, transform: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """R = sum_i g_i * (r M)_i for r [N, K], M [K, K], g [N, K]."""
    return ((objective_rewards @ transform) * gate).sum(-1)


def train_gating(
    prompt: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    weights: torch.Tensor,
    transform: torch.Tensor,
    steps: int = 2000,
    lr: float = 1e-3,
    batch_size: int = 1024,
    hidden: int = 1024,
    n_hidden: int = 3,
    temperature: float = 10.0,
    dropout: float = 0.2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    checkpoints=None,
) -> tuple[GatingNetwork, list[float]]:
    """Bradley-Terry on frozen features: only the gate trains (W and M fixed). The gate runs once per pair
    from the prompt feature, so chosen and rejected get the same weights.

    dtype bfloat16: features in bf16 and the gate's forward under CPU/CUDA autocast, with float32 master weights
    and a float32 loss (mixed precision); the returned gate is float32 either way."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"gating training runs in float32 or bfloat16, got {dtype}")
    torch.manual_seed(seed)
    gate = GatingNetwork(prompt.shape[1], weights.shape[0], hidden, n_hidden, temperature, dropout)
    opt = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    device = "cuda" if prompt.is_cuda else "cpu"
    prompt, chosen, rejected = prompt.to(dtype), chosen.to(dtype), rejected.to(dtype)
    weights, transform = weights.to(dtype), transform.to(dtype)
    r_chosen, r_rejected = chosen @ weights.T, rejected @ weights.T  # frozen stage-1 objectives
    gen = torch.Generator().manual_seed(seed)
    losses, start = [], 0
    if checkpoints is not None:
        start, losses = checkpoints.restore(gate, opt, sched, gen)
    gate.train()
    for step in range(start, steps):
        idx = torch.randint(0, len(prompt), (min(batch_size, len(prompt)),), generator=gen)
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            g = gate(prompt[idx])
            margin = armo_score(r_chosen[idx], transform, g) - armo_score(r_rejected[idx], transform, g)
        margin = margin.float()
        loss = F.binary_cross_entropy_with_logits(margin, torch.ones_like(margin))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if checkpoints is not None and checkpoints.due(step):
            checkpoints.save(step, gate, opt, sched, gen, losses)
    gate.eval()
    return gate, losses
