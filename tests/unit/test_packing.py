"""Shared-prompt packing: the packed forward gives the same log-probs and gradients as one row per sample."""

import pytest
import torch

from tests.unit.tiny_models import tiny_lm
from troupe.actors.learner.batch import pad_sequences
from troupe.actors.learner.logprobs import response_logprobs
from troupe.actors.learner.packing import pack_groups


def _groups():
    prompts = [(1, 2, 3, 4)] * 3 + [(5, 6)] * 3
    responses = [(7, 8, 9), (10,), (11, 12, 13, 14, 15), (16, 17), (18, 19, 20, 21), (22,)]
    return pad_sequences(prompts, responses, pad_id=0)


def test_pack_layout_masks_and_sources():
    ids, _, action = _groups()
    packed = pack_groups(ids, action, group_size=3)
    assert packed.input_ids[0, :13].tolist() == [1, 2, 3, 4, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    assert packed.position_ids[0, 4:8].tolist() == [4, 5, 6, 4]  # each response restarts after the prompt
    att = packed.attention[0, 0]
    assert (
        att[7, :4].all() and not att[7, 4:7].any() and att[7, 7]
    )  # response 2 sees the prompt, not response 1
    width = packed.input_ids.shape[1]
    assert packed.source[:4].tolist() == [
        3,
        4,
        5,
        3,
    ]  # response 1 from the prompt end and its own tokens; then 2
    assert packed.source[9:11].tolist() == [width + 1, width + 2]
    assert packed.targets.tolist() == [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]


def test_groups_with_different_prompts_are_not_packed():
    ids, _, action = pad_sequences([(1, 2), (1, 3)], [(4,), (5,)], pad_id=0)
    assert pack_groups(ids, action, group_size=2) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_logprobs_and_gradients_equal_unpacked_bf16_and_fp32(dtype):
    ids, att, action = _groups()
    _packed_equals_unpacked(ids, att, action, dtype)


def _packed_equals_unpacked(ids, att, action, dtype) -> torch.Tensor:
    """Log-probs and gradients through packed groups of 3 equal those of one row per sample; the unpacked
    log-probs."""
    temps = torch.full((len(ids),), 0.9)
    results = []
    for group_size in (1, 3):
        model = tiny_lm(dtype)
        logp, _ = response_logprobs(model, ids, att, action, temps, group_size=group_size)
        (logp * torch.arange(1, len(ids) + 1)[:, None]).sum().backward()
        grad = torch.cat([p.grad.float().flatten() for p in model.parameters()])
        results.append((logp.detach(), grad, getattr(model, "_troupe_packing", None)))
    (plain, g_plain, _), (packed, g_packed, used) = results
    assert used is True
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(packed, plain, atol=tol)
    assert float((g_packed - g_plain).norm() / g_plain.norm()) < tol
    return plain


def test_a_wrong_packing_is_caught_by_the_agreement_check():
    """If responses could see each other (a plain causal mask over the packed sequence), the check rejects it."""
    from dataclasses import replace

    from troupe.actors.learner.logprobs import _agree, _fused

    ids, att, action = _groups()
    model = tiny_lm()
    packed = pack_groups(ids, action, group_size=3)
    width = packed.input_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril().expand_as(packed.attention)
    wrong = replace(packed, attention=causal)
    positions = action.bool()
    args = (ids, att, positions, ids[:, 1:][positions], torch.ones(int(positions.sum())), False, 1024)
    with torch.no_grad():
        plain, _ = _fused(model, model, *args)
        right, _ = _fused(model, model, *args, packed)
        bad, _ = _fused(model, model, *args, wrong)
    assert _agree(plain, right) and not _agree(plain, bad)


def _packed_logprobs(model, prompts, responses, packed_attention=None):
    """fp32 log-probs of the rows through the packed forward (optionally with another attention mask)."""
    from dataclasses import replace

    from troupe.actors.learner.logprobs import _fused

    ids, att, action = pad_sequences(prompts, responses, pad_id=0)
    packed = pack_groups(ids, action, group_size=len(responses))
    if packed_attention is not None:
        packed = replace(packed, attention=packed_attention(packed))
    positions = action.bool()
    args = (ids, att, positions, ids[:, 1:][positions], torch.full((int(positions.sum()),), 0.7), False, 1024)
    with torch.no_grad():
        flat, _ = _fused(model, model, *args, packed)
    logp = torch.zeros(action.shape)
    logp[positions] = flat.float()
    return logp


def test_changing_one_response_leaves_its_siblings_log_probs_bit_identical():
    """The exact packing check: in fp32, a sibling's log-probs do not move by one bit when another response of
    its group changes (a mask that leaks, even one token, moves them); the changed response's own do move."""
    model = tiny_lm(torch.float32)
    prompts = [(1, 2, 3, 4, 5)] * 4
    responses = [(7, 8, 9, 10), (11, 12, 13, 14), (15, 16, 17, 18), (19, 20, 21, 22)]
    changed = [*responses[:2], (30, 31, 32, 33), responses[3]]
    before = _packed_logprobs(model, prompts, responses)
    after = _packed_logprobs(model, prompts, changed)
    for row in (0, 1, 3):
        assert torch.equal(after[row], before[row]), row
    assert not torch.equal(after[2], before[2])

    def leak_one_token(packed):  # response 4 may see the last token of response 3
        attention = packed.attention.clone()
        attention[0, 0, 5 + 12 :, 5 + 11] = True
        return attention

    leaky_before = _packed_logprobs(model, prompts, responses, leak_one_token)
    leaky_after = _packed_logprobs(model, prompts, changed, leak_one_token)
    assert not torch.equal(leaky_after[3], leaky_before[3])  # the exact check catches a one-token leak


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_responses_with_untrained_tokens_inside_pack_like_unpacked(dtype):
    """Multi-turn rows: observation tokens between turns carry no loss (action mask 0) but stay context. Packed,
    each trained token is predicted from the same context as unpacked, and the targets line up."""
    ids, att, action = _groups()
    action[0, 4] = 0  # row 0's second response token is an observation
    action[2, 5:7] = 0  # row 2: two in the middle
    action[4, 1] = 0  # row 4 (group 2): its first response token is context, so its prompt looks longer
    packed = pack_groups(ids, action, group_size=3)
    assert packed is None  # group 2's rows no longer share where their trained tokens start: not packed
    action[4, 1] = 1
    packed = pack_groups(ids, action, group_size=3)
    assert packed.targets.tolist() == ids[:, 1:][action.bool()].tolist()
    assert packed.input_ids[0, :13].tolist() == [
        1,
        2,
        3,
        4,
        7,
        8,
        9,
        10,
        11,
        12,
        13,
        14,
        15,
    ]  # all tokens kept
    assert len(packed.source) == int(action.sum())
    plain = _packed_equals_unpacked(ids, att, action, dtype)
    assert torch.equal(plain[action == 0], torch.zeros(int((action == 0).sum())))
