"""ArmoRM math against hand-computed values: rescaling, ridge, gate softmax axis, debiasing, transform, BT gate."""

import pytest
import torch

from troupe.actors.reward import armo


def test_rescale_maps_scale_to_unit_interval_and_rejects_out_of_scale():
    out = armo.rescale([1, 3, None, 5], 1, 5, "helpfulness")
    assert out[:2].tolist() == [0.0, 0.5] and torch.isnan(out[2]) and out[3] == 1.0
    with pytest.raises(
        ValueError, match=r"ratings.jsonl:2: objective 'coherence' rating 6.0 is outside its scale \[1, 5\]"
    ):
        armo.rescale([2.0, 6.0], 1, 5, "coherence", ["ratings.jsonl:1", "ratings.jsonl:2"])


def test_ridge_closed_form():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([1.0, 2.0, 3.0])
    # (X'X + I)^-1 X'y = 1/8 [[3,-1],[-1,3]] [4,5] = [7/8, 11/8]
    assert torch.allclose(armo.ridge(x, y, 1.0), torch.tensor([7 / 8, 11 / 8]))


def test_fit_objectives_ignores_missing_labels_per_objective():
    torch.manual_seed(0)
    x = torch.randn(200, 6)
    true = torch.randn(2, 6)
    y = x @ true.T
    y[:100, 1] = float("nan")  # objective 1 labelled on half the rows only
    w, alphas, mses, rows = armo.fit_objectives(x, y)
    assert rows.tolist() == [200, 100]
    assert torch.allclose(w, true, atol=1e-2)
    assert alphas.max() <= 1.0 and mses.max() < 1e-3  # noiseless: the smallest penalties win


def test_gate_softmax_runs_over_objectives_not_pair_sides():
    gate = armo.GatingNetwork(4, 3, hidden=8, n_hidden=2, temperature=10.0, dropout=0.0)
    with torch.no_grad():
        gate.logit_scale.fill_(2.0)
    x = torch.randn(5, 4)
    g = gate(x)
    assert torch.allclose(g.sum(-1), torch.full((5,), 2.0))  # sums to the learned scale over objectives
    paired = gate(torch.stack([x, x], dim=1))  # [B, 2, d] like the public script's input
    assert torch.allclose(paired.sum(-1), torch.full((5, 2), 2.0))
    assert not torch.allclose(paired, torch.ones_like(paired))  # the bug would give 0.5 * s = 1 everywhere


def test_spearman_with_ties():
    a = torch.tensor([1.0, 2.0, 2.0, 3.0])
    b = torch.tensor([10.0, 20.0, 30.0, 40.0])
    # ranks a: 0, 1.5, 1.5, 3 ; b: 0,1,2,3 -> pearson of centred ranks = 4.5 / sqrt(4.5 * 5)
    assert armo.spearman(a, b) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert armo.spearman(b, -b) == pytest.approx(-1.0)


def test_debiasing_reaches_the_target_correlation_and_transform_applies_it():
    torch.manual_seed(1)
    verbose = torch.rand(500)
    helpful = 0.6 * verbose + 0.4 * torch.rand(500)  # strongly verbosity-driven
    independent = torch.rand(500)
    r = torch.stack([helpful, verbose, independent], dim=1)
    lam, before, after = armo.verbosity_penalties(r, verbosity=1, threshold=0.03)
    assert before[0] > 0.5 and after[0] <= 0.03
    assert lam[0] > 0 and lam[1] == 1.0
    assert lam[2] == 0.0  # already uncorrelated: the first grid value (0) passes
    m = armo.transform_matrix(lam, 1)
    debiased = r @ m
    assert torch.allclose(debiased[:, 0], helpful - lam[0] * verbose)
    assert torch.allclose(debiased[:, 1], torch.zeros(500))
    assert torch.allclose(debiased[:, 2], independent)


def test_gate_training_applies_the_transform():
    """The public script trains on r instead of r M; here M matters: zeroing the informative objective hurts."""
    torch.manual_seed(0)
    n, d = 256, 8
    prompt = torch.randn(n, d)
    chosen, rejected = torch.randn(n, d), torch.randn(n, d)
    w = torch.zeros(2, d)
    w[0, 0] = 1.0  # objective 0 reads feature 0
    w[1, 1] = 1.0
    chosen[:, 0] += 2.0  # chosen responses score higher on objective 0 only
    kw = dict(steps=150, lr=1e-2, batch_size=128, hidden=16, n_hidden=1, dropout=0.0)

    def accuracy(transform):
        gate, _ = armo.train_gating(prompt, chosen, rejected, w, transform, **kw)
        with torch.no_grad():
            g = gate(prompt)
            return float(
                (armo.armo_score(chosen @ w.T, transform, g) > armo.armo_score(rejected @ w.T, transform, g))
                .float()
                .mean()
            )

    assert accuracy(torch.eye(2)) > 0.85
    assert accuracy(torch.diag(torch.tensor([0.0, 1.0]))) < 0.7
