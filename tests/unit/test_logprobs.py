"""Response log-probs: at the rollout's sampling temperature, only at response positions, chunked, in bf16 and
fp32, equal to a plain log_softmax over the full logits."""

import pytest
import torch

from tests.unit.tiny_models import tiny_lm
from troupe.actors.learner.batch import pad_sequences
from troupe.actors.learner.logprobs import response_logprobs


def _batch():
    return pad_sequences([(1, 2, 3), (4, 5)], [(6, 7, 8, 9), (10, 11)], pad_id=0)


def _reference(model, ids, att, action, temperature):
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float() / temperature[:, None, None]
    logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return logp * action


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_logprobs_use_the_sampling_temperature(temperature):
    model = tiny_lm()
    ids, att, action = _batch()
    temps = torch.full((2,), temperature)
    logp, _ = response_logprobs(model, ids, att, action, temps)
    assert torch.allclose(logp, _reference(model, ids, att, action, temps), atol=1e-5)
    if temperature != 1.0:  # the old behaviour (always T=1) is measurably different
        at_one, _ = response_logprobs(model, ids, att, action, torch.ones(2))
        assert (at_one - logp).abs().max() > 1e-2


def test_per_row_temperatures_and_greedy_rows():
    model = tiny_lm()
    ids, att, action = _batch()
    temps = torch.tensor([0.5, 0.0])  # greedy rows are scored at T = 1
    logp, _ = response_logprobs(model, ids, att, action, temps)
    assert torch.allclose(logp, _reference(model, ids, att, action, torch.tensor([0.5, 1.0])), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunked_logprobs_and_gradients_equal_unchunked_bf16_and_fp32(dtype):
    model = tiny_lm(dtype)
    ids, att, action = _batch()
    temps = torch.full((2,), 0.8)
    grads = []
    for chunk in (1, 3, 1024):
        model.zero_grad()
        logp, entropy = response_logprobs(model, ids, att, action, temps, with_entropy=True, chunk=chunk)
        assert logp.dtype == torch.float32 and (entropy[action.bool()] > 0).all()
        logp.sum().backward()
        grads.append(torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None]))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for g in grads[:2]:
        assert float((g - grads[2]).norm() / grads[2].norm()) < tol
    ref = _reference(model, ids, att, action, temps)
    assert torch.allclose(logp.detach(), ref, atol=5e-2 if dtype == torch.bfloat16 else 1e-5)
    assert (logp[~action.bool()] == 0).all()


def test_a_head_that_scales_its_logits_takes_the_full_path():
    """Granite-style logit scaling: applying the head by hand would be wrong, so the full forward is used."""
    model = tiny_lm()
    ids, att, action = _batch()
    temps = torch.ones(2)
    plain, _ = response_logprobs(model, ids, att, action, temps)
    model.config.logits_scaling = 4.0
    model._troupe_fused_head = None  # decide again

    original = type(model).forward

    def scaled_forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.logits = out.logits / self.config.logits_scaling
        return out

    type(model).forward = scaled_forward
    try:
        logp, _ = response_logprobs(model, ids, att, action, temps)
        assert torch.allclose(logp, _reference(model, ids, att, action, temps), atol=1e-5)
        assert (logp - plain).abs().max() > 1e-2
        assert model._troupe_fused_head is False
    finally:
        type(model).forward = original


def test_a_micro_batch_without_response_tokens_still_reaches_every_parameter():
    """Dropped samples carry no response token; their micro-batch must still backpropagate (zeros) through every
    parameter, or a ZeRO rank would skip the gradient hooks its peers wait in."""
    ids, att, action = _batch()
    none = torch.zeros_like(action)
    for warm in (False, True):  # the full-logits path (nothing checked yet), then the fused head once decided
        model = tiny_lm()
        if warm:
            response_logprobs(model, ids, att, action, torch.ones(2))
            assert model._troupe_fused_head is True
        forwards = []
        hook = model.model.register_forward_hook(lambda *_, seen=forwards: seen.append(1))
        logp, _ = response_logprobs(model, ids, att, none, torch.ones(2))
        hook.remove()
        assert len(forwards) == 1  # the one forward its peers also run: no extra gathers under ZeRO-3
        assert (logp == 0).all() and logp.requires_grad
        logp.sum().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None for g in grads) and all((g == 0).all() for g in grads)
        if not warm:  # an empty call decides nothing about the fused head
            assert getattr(model, "_troupe_fused_head", None) is None
