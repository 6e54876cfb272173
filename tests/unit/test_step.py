"""The optimizer step's loss normalisation: a token's weight does not depend on micro-batch size or world size."""

import pytest
import torch

from tests.unit.tiny_models import tiny_lm
from troupe.actors.learner.batch import pad_sequences
from troupe.actors.learner.logprobs import response_logprobs
from troupe.actors.learner.step import LOSS_AGGREGATIONS, StepNorm, micro_batches, step_rows


def _rows():
    prompts = [(1, 2), (3,), (4, 5, 6), (7,)]
    responses = [(8, 9, 10, 11, 12), (13,), (14, 15), (16, 17, 18)]  # uneven lengths: where the bias shows
    return pad_sequences(prompts, responses, pad_id=0)


def _gradient(mode: str, micro: int, world: int, dtype=torch.float32) -> torch.Tensor:
    """Simulates `world` ranks (DeepSpeed averages their gradients) each cutting its rows into micro-batches."""
    ids, att, action = _rows()
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0])
    shares = torch.arange(4).chunk(world)
    tokens, sequences = float(action.sum()), 4.0
    norm = StepNorm(tokens, sequences, world, budget=6)
    total = None
    for share in shares:
        model = tiny_lm(dtype)
        for rows in micro_batches(share, att.sum(-1), micro):
            logp, _ = response_logprobs(model, ids[rows], att[rows], action[rows], torch.ones(len(rows)))
            loss = norm.reduce(-logp * adv[rows, None], action[rows], mode)
            loss.backward()
        grad = torch.cat([p.grad.float().flatten() for p in model.parameters()])
        total = grad if total is None else total + grad
    return total / world  # the all-reduce average


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_token_mean_gradient_is_the_same_for_any_micro_batch_and_world_size(mode):
    whole = _gradient(mode, micro=4, world=1)
    for micro, world in ((1, 1), (1, 2), (2, 2)):
        assert _relative_error(_gradient(mode, micro=micro, world=world), whole) < 1e-5


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_per_micro_batch_means_would_differ():
    """The old rule (each micro-batch's own token mean, weighted 1/k) gives a different gradient here."""
    ids, att, action = _rows()
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0])
    grads = []
    for micro in (4, 1):
        model = tiny_lm()
        chunks = micro_batches(torch.arange(4), att.sum(-1), micro)
        for rows in chunks:
            logp, _ = response_logprobs(model, ids[rows], att[rows], action[rows], torch.ones(len(rows)))
            m = action[rows]
            ((-logp * adv[rows, None] * m).sum() / m.sum() / len(chunks)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert _relative_error(grads[1], grads[0]) > 1e-2


def test_token_mean_gradient_bf16_matches_fp32_within_bf16_precision():
    fp32 = _gradient("token_mean", micro=1, world=2)
    bf16 = _gradient("token_mean", micro=1, world=2, dtype=torch.bfloat16)
    assert _relative_error(bf16, fp32) < 5e-2


def test_token_mean_is_the_global_mean_and_the_modes_differ():
    per_token = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    norm = StepNorm(tokens=4, sequences=2, world=1, budget=3)
    assert norm.reduce(per_token, mask, "token_mean").item() == pytest.approx(7 / 4)
    assert norm.reduce(per_token, mask, "seq_mean_token_mean").item() == pytest.approx((1 + 4) / 2)
    assert norm.reduce(per_token, mask, "seq_mean_token_sum_norm").item() == pytest.approx(7 / (2 * 3))
    # a micro-batch holding only row 1 contributes its share of the step, not its own mean
    assert norm.reduce(per_token[1:], mask[1:], "token_mean").item() == pytest.approx(4 / 4)
    with pytest.raises(ValueError, match="loss aggregation"):
        norm.reduce(per_token, mask, "sum")


def test_steps_cover_rows_once_and_micro_batches_group_by_length():
    steps = step_rows(7, mini_batches=2, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert sorted(torch.cat(steps).tolist()) == list(range(7)) and len(steps) == 2
    assert len(step_rows(3, mini_batches=5, shuffle=False)) == 3  # never an empty step
    lengths = torch.tensor([9, 2, 8, 3])
    groups = micro_batches(torch.arange(4), lengths, 2)
    assert [g.tolist() for g in groups] == [[1, 3], [2, 0]]
