"""`troupe job=rm_import`: a tiny random checkpoint saved with the published ArmoRM tensor names, config keys and
sharded index is imported through the Hydra entry (`cluster.driver.run`); the bundle, served by `BundleScorer` and
by a `RewardShard`, scores like the model card's forward reimplemented here on that checkpoint's files. No Ray."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaModel

from tests.unit.tiny_models import llama3_style_tokenizer, tiny_llama_config
from troupe.actors.protocol import Prompt, Rollout
from troupe.actors.reward.bundle import BundleScorer, read_info
from troupe.actors.reward.shard import RewardShard, ShardSpec
from troupe.cluster.config.compose import CONF_DIR
from troupe.cluster.run.driver import run

K, HIDDEN, GATE_HIDDEN, N_HIDDEN, TEMPERATURE, LOGIT_SCALE = 5, 32, 16, 2, 3.0, 1.7
CHATS = [
    (
        [{"role": "user", "content": 'What are some synonyms for the word "beautiful"?'}],
        "Nicely, Beautifully, Handsome, Stunning, Wonderful, Gorgeous, Pretty, Stunning, Elegant",
    ),
    (
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3 + 3?"},
        ],
        "6.",
    ),
    ([{"role": "user", "content": "Hi"}], "Hello! How can I help you today? Ask me about numbers."),
    ([{"role": "user", "content": "Print one."}], "```python\nprint(1)\n```\n\nThat prints 1."),
    ([{"role": "user", "content": "Yes or no?"}], "no"),
]
GATE_PATTERN = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"  # the card's token_pattern text


def write_armo_checkpoint(folder, drop_everywhere=(), drop_from_shard=()):
    """A checkpoint laid out like RLHFlow/ArmoRM-Llama3-8B-v0.1: published tensor names, config keys, a sharded
    index with the heads in the last shard, the tokenizer, and a modeling_custom.py that must never run."""
    folder.mkdir(parents=True)
    tok = llama3_style_tokenizer()
    cfg = tiny_llama_config(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        max_position_embeddings=256,
        initializer_range=0.3,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    tensors = {f"model.{k}": v for k, v in LlamaModel(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(1)
    tensors["regression_layer.weight"] = torch.randn(K, HIDDEN, generator=g) * 0.5
    transform = torch.eye(K)
    transform[4] -= (
        torch.rand(K, generator=g) * 0.5
    )  # debiasing against objective 4, as stage-2_train.py builds it
    tensors["reward_transform_matrix"] = transform
    dims = [HIDDEN] + [GATE_HIDDEN] * N_HIDDEN + [K]
    for i in range(N_HIDDEN + 1):
        tensors[f"gating.layers.{i}.weight"] = (
            torch.randn(dims[i + 1], dims[i], generator=g) * 2 / dims[i] ** 0.5
        )
        tensors[f"gating.layers.{i}.bias"] = torch.randn(dims[i + 1], generator=g) * 0.1
    tensors["gating.logit_scale"] = torch.tensor([LOGIT_SCALE])
    for name in drop_everywhere:
        del tensors[name]
    first = {k for k in tensors if k.startswith(("model.embed_tokens.", "model.layers.0."))}
    shards = {
        "model-00001-of-00002.safetensors": {k: tensors[k] for k in sorted(first)},
        "model-00002-of-00002.safetensors": {k: tensors[k] for k in sorted(set(tensors) - first)},
    }
    weight_map = {k: file for file, part in shards.items() for k in part}
    for file, part in shards.items():
        save_file(
            {k: v for k, v in part.items() if k not in drop_from_shard}, str(folder / file), {"format": "pt"}
        )
    index = {
        "metadata": {"total_size": sum(t.numel() * 4 for t in tensors.values())},
        "weight_map": weight_map,
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = cfg.to_dict() | {
        "architectures": ["LlamaForRewardModelWithGating"],
        "auto_map": {"AutoModelForSequenceClassification": "modeling_custom.LlamaForRewardModelWithGating"},
        "num_objectives": K,
        "gating_temperature": TEMPERATURE,
        "gating_hidden_dim": GATE_HIDDEN,
        "gating_n_hidden": N_HIDDEN,
    }
    (folder / "config.json").write_text(json.dumps(config))
    tok.save_pretrained(folder)
    (folder / "modeling_custom.py").write_text("raise RuntimeError('remote code ran')\n")
    return folder


def card_forward(folder, tok, messages):
    """The card's forward on the checkpoint's own files: backbone on `apply_chat_template(messages)`, reward at
    (first pad - 1) mod L, gate at the last occurrence of the token pattern, score = sum(g * (r @ M))."""
    cfg = json.loads((folder / "config.json").read_text())
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    weights = {}
    for file in sorted(set(index["weight_map"].values())):
        weights |= load_file(str(folder / file))
    body = LlamaModel(LlamaConfig(**cfg)).eval()
    body.load_state_dict({k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")})
    out = tok.apply_chat_template(messages)
    ids = torch.tensor([list(out["input_ids"] if not isinstance(out, list) else out)])
    with torch.no_grad():
        hidden = body(input_ids=ids).last_hidden_state[0]
    length = ids.shape[1]
    reward_at = (int(torch.eq(ids[0], cfg["pad_token_id"]).int().argmax()) - 1) % length
    pattern = tok(GATE_PATTERN, add_special_tokens=False)["input_ids"]
    row = ids[0].tolist()
    gate_at = max(j for j in range(length - len(pattern) + 1) if row[j : j + len(pattern)] == pattern)
    rewards = hidden[reward_at] @ weights["regression_layer.weight"].T
    x = hidden[gate_at]
    n = cfg["gating_n_hidden"]
    for i in range(n + 1):
        x = x @ weights[f"gating.layers.{i}.weight"].T + weights[f"gating.layers.{i}.bias"]
        x = torch.relu(x) if i < n else x
    gate = torch.softmax(x / cfg["gating_temperature"], dim=-1) * weights["gating.logit_scale"][0]
    adjusted = rewards @ weights["reward_transform_matrix"]
    return (gate * adjusted).sum(), adjusted, gate


def _import_cfg(tmp_path, checkpoint, output):
    overrides = [
        "job=rm_import",
        f"rm.checkpoint={checkpoint}",
        f"rm.output={output}",
        f"run.output_dir={tmp_path / 'run'}",
        "run.progress_bar=false",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return OmegaConf.to_object(compose(config_name="config", overrides=overrides))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("armo")
    checkpoint = write_armo_checkpoint(tmp / "ArmoRM-tiny")
    result = run(_import_cfg(tmp, checkpoint, tmp / "bundle"))
    return checkpoint, result


def test_import_writes_a_bundle_without_remote_code(imported, capsys):
    checkpoint, result = imported
    bundle = result["bundle"]
    info = read_info(bundle)
    assert info.name == "armo" and info.objectives == [f"objective_{i}" for i in range(K)]
    assert info.gating == {"hidden": GATE_HIDDEN, "n_hidden": N_HIDDEN, "temperature": TEMPERATURE}
    assert info.stats["import"]["config_defaults_used"] == []
    backbone = bundle / "backbone"
    config = json.loads((backbone / "config.json").read_text())
    assert "auto_map" not in config and config["architectures"] == ["LlamaModel"]
    assert not (backbone / "modeling_custom.py").exists()
    assert sorted(p.name for p in backbone.glob("*.safetensors")) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert not list(bundle.rglob("*.bin")) and not list(bundle.rglob("*.pt"))


def test_served_scores_equal_the_cards_formula(imported):
    checkpoint, result = imported
    tok = AutoTokenizer.from_pretrained(checkpoint)
    expected = [card_forward(checkpoint, tok, [*p, {"role": "assistant", "content": r}]) for p, r in CHATS]
    scorer = BundleScorer(result["bundle"], batch_size=3)  # batches of unequal lengths: padding is exercised
    served = scorer.score([p for p, _ in CHATS], [r for _, r in CHATS])
    score = torch.stack([e[0] for e in expected])
    assert score.std() > 1e-3  # the chats score differently: equality below is not trivial
    torch.testing.assert_close(served["armo"], score, rtol=0, atol=1e-4)
    for i in range(K):
        torch.testing.assert_close(
            served[f"armo/objective_{i}"], torch.stack([e[1][i] for e in expected]), rtol=0, atol=1e-4
        )
        torch.testing.assert_close(
            served[f"gate/objective_{i}"], torch.stack([e[2][i] for e in expected]), rtol=0, atol=1e-4
        )

    rollouts = [
        Rollout(
            Prompt(f"p{i}", (), p[-1]["content"], messages=tuple((m["role"], m["content"]) for m in p)),
            0,
            (),
            r,
            torch.zeros(0),
            0,
            "stop",
            1.0,
        )
        for i, (p, r) in enumerate(CHATS)
    ]
    shard = RewardShard(ShardSpec(bundles=(str(result["bundle"]),), batch_size=2))
    torch.testing.assert_close(shard.score(rollouts)["armo"], score, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "drop, names",
    [
        ({"drop_everywhere": ("reward_transform_matrix",)}, "model.safetensors.index.json"),
        ({"drop_from_shard": ("reward_transform_matrix",)}, "model-00002-of-00002.safetensors"),
    ],
    ids=["not-in-index", "not-in-shard"],
)
def test_missing_transform_matrix_is_named_with_its_file(tmp_path, drop, names):
    checkpoint = write_armo_checkpoint(tmp_path / "broken", **drop)
    with pytest.raises(ValueError, match=rf"{names}: tensor 'reward_transform_matrix' is missing"):
        run(_import_cfg(tmp_path, checkpoint, tmp_path / "bundle"))
    assert not (tmp_path / "bundle").exists()  # nothing half-written looks like a bundle


def test_a_template_that_tokenizes_differently_from_the_card_is_refused(tmp_path):
    checkpoint = write_armo_checkpoint(tmp_path / "other")
    tok = AutoTokenizer.from_pretrained(checkpoint)
    # A chat template without the Llama-3 headers: the published gate pattern never occurs.
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|eot_id|>' }}{% endfor %}"
    )
    tok.save_pretrained(checkpoint)
    with pytest.raises(ValueError, match="gate pattern"):
        run(_import_cfg(tmp_path, checkpoint, tmp_path / "bundle"))
