"""The off-policy correction modes (actors/learner/off_policy.py) against hand-computed values: token and
sequence truncated IS, geometric-mean row masking, IcePop token masking, the mismatch KL; finite for any input,
detached, in fp32 and bf16, and row by row (a micro-batch's other rows change nothing)."""

import math

import pytest
import torch

from troupe.actors.learner.config import CORRECTIONS
from troupe.actors.learner.off_policy import DEFAULT_BOUNDS, correction_weights, mismatch_kl

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def _logs(*rows):
    return torch.log(torch.tensor(rows, dtype=torch.float64))


def test_sequence_tis_weighs_every_token_by_the_row_product_capped():
    old = _logs([0.5, 0.5, 0.5], [0.9, 0.5, 1.0])
    behaviour = _logs([0.4, 0.5, 0.5], [0.3, 0.5, 0.01])  # row 2: token 3 is padding (outside the mask)
    w, masked = correction_weights("seq_tis", old, behaviour, MASK, cap=2.0)
    assert torch.allclose(w[0], torch.full((3,), 1.25, dtype=w.dtype))  # 1.25 * 1 * 1
    assert torch.allclose(w[1], torch.full((3,), 2.0, dtype=w.dtype))  # 3 * 1 capped at 2; padding ignored
    assert not masked.any()


def test_sequence_mask_keeps_the_row_product_inside_the_bounds_and_zeroes_the_row_outside():
    old = _logs([0.5, 0.5, 0.5], [0.9, 0.5, 1.0])
    behaviour = _logs([0.4, 0.5, 0.5], [0.2, 0.5, 0.01])  # products 1.25 | 4.5 (padding ignored)
    w, masked = correction_weights("seq_mask", old, behaviour, MASK, cap=2.0)
    assert DEFAULT_BOUNDS["seq_mask"] == (0.0, 3.0)  # TRL: clip_max 3, no clip_min
    assert torch.allclose(w[0], torch.full((3,), 1.25, dtype=w.dtype))  # kept as the weight, not capped at 2
    assert w[1].tolist() == [0.0, 0.0, 0.0]  # 4.5 > 3: the whole row
    assert masked.tolist() == [[False, False, False], [True, True, False]]
    w, masked = correction_weights("seq_mask", old, behaviour, MASK, cap=2.0, bounds=(1.3, 5.0))
    assert w[0].tolist() == [0.0, 0.0, 0.0] and masked[0].all()  # 1.25 < 1.3
    assert torch.allclose(w[1], torch.full((3,), 4.5, dtype=w.dtype)) and not masked[1].any()


def test_geometric_mask_rejects_whole_rows_out_of_bounds():
    old = _logs([0.5, 0.5, 0.5], [0.5, 0.5, 1.0])
    behaviour = _logs([0.5, 0.5, 0.4975], [0.5, 0.4, 0.01])  # row 1: geo mean 1.00167; row 2: 1.118
    w, masked = correction_weights("geo_mask", old, behaviour, MASK, cap=2.0)
    assert DEFAULT_BOUNDS["geo_mask"] == (0.99, 1.01)
    assert w[0].tolist() == [1.0, 1.0, 1.0] and w[1].tolist() == [0.0, 0.0, 0.0]
    assert masked.tolist() == [[False, False, False], [True, True, False]]  # padding is not "masked"
    w, masked = correction_weights("geo_mask", old, behaviour, MASK, cap=2.0, bounds=(None, 1.2))
    assert not masked.any()  # the upper bound given, the lower one the default


def test_icepop_keeps_the_ratio_inside_the_bounds_and_zeroes_it_outside():
    old = _logs([0.5, 0.9, 0.2], [0.5, 0.5, 1.0])
    behaviour = _logs([0.25, 0.1, 0.5], [0.5, 0.05, 0.01])  # ratios 2, 9, 0.4 | 1, 10, (padding)
    w, masked = correction_weights("icepop", old, behaviour, MASK, cap=2.0)
    expected = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=w.dtype)
    assert torch.allclose(w * MASK, expected)  # 9 > 5 and 0.4 < 0.5 masked, 2 and 1 kept as weights
    assert masked.tolist() == [[False, True, True], [False, True, False]]
    w, _ = correction_weights("icepop", old, behaviour, MASK, cap=2.0, bounds=(0.3, 10.0))
    assert torch.allclose(w * MASK, torch.tensor([[2.0, 9.0, 0.4], [1.0, 10.0, 0.0]], dtype=w.dtype))


@pytest.mark.parametrize("mode", CORRECTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_mode_is_finite_detached_and_row_by_row(mode, dtype):
    gen = torch.Generator().manual_seed(0)
    old = (torch.randn(6, 7, generator=gen) * 3).to(dtype).requires_grad_(True)
    behaviour = (torch.randn(6, 7, generator=gen) * 3).to(dtype)
    behaviour[0, 0], behaviour[1, 1], behaviour[2, 2] = -1e4, 1e4, -float("inf")  # overflow bait
    mask = (torch.rand(6, 7, generator=gen) > 0.2).float()
    w, masked = correction_weights(mode, old, behaviour, mask, cap=2.0)
    assert torch.isfinite(w).all() and not w.requires_grad
    assert not (masked & ~mask.bool()).any()
    # a micro-batch of rows 2..4 gets exactly the weights those rows get in the whole batch
    part, _ = correction_weights(mode, old[2:5], behaviour[2:5], mask[2:5], cap=2.0)
    assert torch.equal(part, w[2:5])


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="token_tis, seq_tis, seq_mask, geo_mask, icepop"):
        correction_weights("tis", torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), cap=2.0)


def test_mismatch_kl_is_the_k3_estimate_and_zero_when_the_policies_agree():
    old, behaviour = _logs([0.5, 0.2]), _logs([0.25, 0.2])
    kl = mismatch_kl(old, behaviour, torch.ones(1, 2))
    assert kl[0, 0].item() == pytest.approx(2.0 - 1.0 - math.log(2.0))  # rho - 1 - log rho, rho = 2
    assert kl[0, 1].item() == 0.0
    huge = mismatch_kl(torch.zeros(1, 1), torch.full((1, 1), -1e6), torch.ones(1, 1))
    assert torch.isfinite(huge).all()
