"""Every reward training and scoring path in bfloat16 and float32, whatever the host CPU has: HaF / Bradley-Terry
(RewardLM + loss + backward), the ArmoRM backbone and bundle scorer, and stage-2 gating training."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from troupe.actors.models import resolve_model
from troupe.actors.reward import armo
from troupe.actors.reward.bundle import BundleHeads, BundleInfo, BundleScorer, save_bundle
from troupe.actors.reward.haf import RewardLM, haf_loss


def _sequence_logprobs(logits, ids, action):
    logits = logits[:, :-1].float()
    logp = logits.gather(-1, ids[:, 1:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (logp * action).sum(-1)


DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")]
PROMPTS = [[{"role": "user", "content": "What is 2 + 2?"}], [{"role": "user", "content": "Say hi"}]]
RESPONSES = ["Answer: 4", "Hi there, nice to meet you."]


@pytest.fixture(scope="module")
def model_path():
    return resolve_model("builtin:tiny-llama")


@pytest.mark.parametrize("dtype", DTYPES)
def test_haf_reward_lm_trains_bf16_and_fp32(model_path, dtype):
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = RewardLM(lm).to(dtype)  # what a DeepSpeed bf16 engine does to the module: the head too
    torch.nn.init.normal_(model.reward_head.weight, std=0.1)
    reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    # chosen rows 0-1, rejected rows 2-3; right-padded, the reward read at each row's last real token
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0], [5, 6, 10, 11, 0], [5, 6, 12, 0, 0]])
    att = (torch.arange(5) < torch.tensor([[5], [3], [4], [3]])).long()
    action = att[:, 1:].float()
    action[:, :1] = 0.0  # the first two tokens are the prompt
    reward, logits = model(ids, att)
    assert reward.dtype == torch.float32 and logits.dtype == dtype
    with torch.no_grad():
        hidden = model.lm(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states[-1]
        last = hidden[torch.arange(4), att.sum(-1) - 1]
        expected = (last.float() @ model.reward_head.weight.float().T).squeeze(
            -1
        ) + model.reward_head.bias.float()
    torch.testing.assert_close(reward, expected, rtol=2e-2, atol=2e-2)
    seq = _sequence_logprobs(logits, ids, action)
    with torch.no_grad():
        ref = _sequence_logprobs(reference(input_ids=ids, attention_mask=att).logits, ids, action)
    total, r_part, p_part = haf_loss(reward[:2], reward[2:], seq[:2], seq[2:], ref[:2], ref[2:], 0.2, 0.1)
    total.mean().backward()
    assert torch.isfinite(total.detach()).all() and float(p_part.detach().mean()) > 0
    assert model.reward_head.weight.grad is not None and model.reward_head.weight.grad.dtype == dtype
    assert torch.isfinite(model.reward_head.weight.grad.float()).all()
    assert model.reward_head.weight.grad.abs().sum() > 0
    body_grad = model.lm.model.embed_tokens.weight.grad
    assert body_grad is not None and body_grad.abs().sum() > 0  # both losses reach the shared body


def _bundle(folder, model_path, hidden=64, k=2):
    torch.manual_seed(1)
    gate = armo.GatingNetwork(hidden, k, hidden=8, n_hidden=1, temperature=10.0, dropout=0.0)
    tensors = {
        "regression": torch.randn(k, hidden) * 0.1,
        "transform": armo.transform_matrix(torch.tensor([0.5, 1.0]), 1),
        "lambda": torch.tensor([0.5, 1.0]),
        "reward_head.weight": torch.randn(1, hidden) * 0.1,
        "reward_head.bias": torch.zeros(1),
    }
    tensors |= {f"gating.{n}": t for n, t in gate.state_dict().items()}
    info = BundleInfo(
        "armo", model_path, 64, ["quality", "verbosity"], "verbosity",
        {"hidden": 8, "n_hidden": 1, "temperature": 10.0}, reward_head=True,
    )  # fmt: skip
    return save_bundle(folder, info, tensors)


@pytest.fixture(scope="module")
def fp32_scores(model_path, tmp_path_factory):
    folder = _bundle(tmp_path_factory.mktemp("bundle"), model_path)
    return folder, BundleScorer(folder, dtype="float32").score(PROMPTS, RESPONSES)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bundle_scorer_runs_the_backbone_in_bf16_and_fp32(fp32_scores, dtype):
    folder, reference = fp32_scores
    name = str(dtype).removeprefix("torch.")
    scorer = BundleScorer(folder, dtype=name)
    assert next(scorer.backbone.model.parameters()).dtype == dtype
    resp, prom = scorer.backbone.features(PROMPTS, RESPONSES)
    assert resp.dtype == prom.dtype == torch.float32 and torch.isfinite(resp).all()
    scores = scorer.score(PROMPTS, RESPONSES)
    assert {"armo", "armo/quality", "armo/verbosity", "gate/quality", "armo/reward_head"} <= set(scores)
    for key, values in scores.items():
        assert values.dtype == torch.float32, key
        # bf16 features differ from fp32 by rounding only: the same scores within bf16 precision
        torch.testing.assert_close(values, reference[key], rtol=0.1, atol=0.05)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gating_trains_bf16_and_fp32(dtype):
    torch.manual_seed(0)
    n, d, k = 64, 16, 3
    prompt, chosen, rejected = torch.randn(n, d), torch.randn(n, d), torch.randn(n, d)
    weights = torch.randn(k, d) * 0.3
    # chosen scores higher on objective 0 for every pair: the gate learns to weight it
    chosen = chosen + weights[0] / weights[0].norm() * 2.0
    kwargs = dict(steps=60, lr=1e-2, batch_size=32, hidden=16, n_hidden=1, dropout=0.0, seed=0)
    gate, losses = armo.train_gating(prompt, chosen, rejected, weights, torch.eye(k), dtype=dtype, **kwargs)
    assert all(p.dtype == torch.float32 for p in gate.parameters())  # fp32 master weights, saved as such
    assert losses[-1] < losses[0] and all(loss == loss for loss in losses)
    _, fp32_losses = armo.train_gating(prompt, chosen, rejected, weights, torch.eye(k), **kwargs)
    if dtype == torch.bfloat16:
        assert losses != fp32_losses  # the forward really ran in bf16
        assert abs(losses[-1] - fp32_losses[-1]) < 0.1
    heads = BundleHeads(
        BundleInfo(
            "armo", "x", 64, ["a", "b", "c"], None, {"hidden": 16, "n_hidden": 1, "temperature": 10.0}
        ),
        {"regression": weights, "transform": torch.eye(k)}
        | {f"gating.{n}": t for n, t in gate.state_dict().items()},
    )
    out = heads.apply(chosen.to(dtype), prompt.to(dtype))  # features in either dtype, scores in float32
    assert out["armo"].dtype == torch.float32 and torch.isfinite(out["armo"]).all()
