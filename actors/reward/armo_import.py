"""Import a checkpoint laid out like the published RLHFlow/ArmoRM-Llama3-8B-v0.1 into a troupe reward bundle.

What the published checkpoint is (read, not copied, from these public sources):
  [card]   https://huggingface.co/RLHFlow/ArmoRM-Llama3-8B-v0.1 (README "Demo Code"; the same demo is in
           github.com/RLHFlow/RLHF-Reward-Modeling armo-rm/README.md)
  [model]  .../ArmoRM-Llama3-8B-v0.1/blob/main/modeling_custom.py (7,520 bytes, LlamaForRewardModelWithGating)
  [config] .../ArmoRM-Llama3-8B-v0.1/blob/main/config.json
  [prep]   RLHF-Reward-Modeling armo-rm/stage-2_prepare.py and stage-2_train.py (how the gate input is taken)

Files: config.json, model-0000{1..4}-of-00004.safetensors + model.safetensors.index.json, tokenizer.json,
tokenizer_config.json, special_tokens_map.json, modeling_custom.py (remote code: never run here).
Config [config]: model_type "llama", hidden_size 4096, 32 layers, vocab_size 128257, pad_token_id 128256,
torch_dtype float32, auto_map AutoModelForSequenceClassification -> modeling_custom.LlamaForRewardModelWithGating,
plus num_objectives 19, gating_temperature 10, gating_hidden_dim 1024, gating_n_hidden 3 ([model] reads these
with `config_dict.get(key, default)`, defaults 19 / 10 / 1024 / 3, so an absent key takes that default here too).
Tensors [model] (module attribute names): `model.*` a LlamaModel (no lm_head); `regression_layer.weight` [K, H]
(Linear, no bias); `reward_transform_matrix` [K, K] (an nn.Parameter, so it is saved); `gating.logit_scale` [1];
`gating.layers.{0..n}.weight|bias`, n = gating_n_hidden: n hidden Linear layers (H -> hidden -> ... -> hidden, with
bias) and a last Linear hidden -> K with bias. The temperature is a plain float: it is not in the safetensors.
Positions [model], for the card's single unpadded sequence `apply_chat_template(messages)`: the reward reads the
hidden state at `(first pad_token_id position - 1) mod L`, i.e. the last token, the `<|eot_id|>` closing the
assistant turn; the gate reads the first token of the last occurrence of the ids of
"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n" ([128009, 128006, 78191, 128007, 271]), i.e. the
`<|eot_id|>` closing the final user turn ([prep] takes `prompt_embedding` there as well).
Score [model]: r = W h_last; g = logit_scale * softmax(MLP(h_gate) / T, dim=objectives), MLP = ReLU after every
Linear but the last; score = sum_i g_i (r M)_i. The card checks the same thing as sum(r * (g M^T)) and applies no
further scaling to `output.score` (its `* 5 - 0.5` only maps HelpSteer predictions back to ratings for display).

That is exactly troupe's `GatingNetwork` (eval mode, so its Dropout is the identity) and `armo_score`, and the
positions are those `RewardBackbone` reads (response: the assistant turn's end-of-turn token; prompt: the last
end-of-turn token of the prompt), so no new head type is needed. Only the gate's state-dict names differ (troupe's
MLP is an nn.Sequential with ReLU/Dropout between the Linear layers): they are remapped. The import checks the rest
instead of assuming it: every expected tensor and shape, and, on probe conversations, that troupe's token ids and
both positions equal the card's. Differences left as they are: troupe truncates long inputs by its rule
(max_length = max_position_embeddings); a response that itself contains the gate pattern moves the card's gate read
into the response, while troupe keeps reading the prompt.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from troupe.actors.reward.armo import GatingNetwork
from troupe.actors.reward.bundle import BundleHeads, BundleInfo, save_bundle

# The 19 attributes in the order of the card's `attributes` list (and stage-2_train.py).
PUBLISHED_OBJECTIVES = (
    "helpsteer-helpfulness",
    "helpsteer-correctness",
    "helpsteer-coherence",
    "helpsteer-complexity",
    "helpsteer-verbosity",
    "ultrafeedback-overall_score",
    "ultrafeedback-instruction_following",
    "ultrafeedback-truthfulness",
    "ultrafeedback-honesty",
    "ultrafeedback-helpfulness",
    "beavertails-is_safe",
    "prometheus-score",
    "argilla-overall_quality",
    "argilla-judge_lm",
    "code-complexity",
    "code-style",
    "code-explanation",
    "code-instruction-following",
    "code-readability",
)
ARMO_KEYS = {
    "num_objectives": 19,
    "gating_temperature": 10.0,
    "gating_hidden_dim": 1024,
    "gating_n_hidden": 3,
}
GATE_PATTERN = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
REGRESSION, TRANSFORM, SCALE = "regression_layer.weight", "reward_transform_matrix", "gating.logit_scale"
PROBES = (  # (prompt, response): the card's own example, a multi-turn chat with a system turn, code
    (
        [{"role": "user", "content": 'What are some synonyms for the word "beautiful"?'}],
        "Nicely, Beautifully, Handsome, Stunning, Wonderful, Gorgeous, Pretty, Stunning, Elegant",
    ),
    (
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3 + 3, twice?"},
        ],
        "6, then 12!\n\nDone.",
    ),
    ([{"role": "user", "content": "Print one."}], "```python\nprint(1)\n```"),
)


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (an ArmoRM checkpoint folder has config.json)")
    cfg = json.loads(path.read_text())
    if cfg.get("model_type") != "llama":
        raise ValueError(f"{path}: model_type is {cfg.get('model_type')!r}; the ArmoRM backbone is 'llama'")
    if "hidden_size" not in cfg:
        raise ValueError(f"{path}: key 'hidden_size' is missing")
    return cfg


def tensor_files(folder: Path) -> tuple[dict[str, str], Path]:
    """{tensor name: shard file name} and the file that lists them (the index, or the single shard)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index}: no 'weight_map'")
        for name in sorted(set(weight_map.values())):
            if not (folder / name).exists():
                raise FileNotFoundError(f"{folder / name}: listed in {index.name} but missing")
        return dict(weight_map), index
    single = folder / "model.safetensors"
    if single.exists():
        with safe_open(str(single), "pt") as f:
            return {k: single.name for k in f.keys()}, single
    raise FileNotFoundError(
        f"{folder}: neither model.safetensors.index.json nor model.safetensors (only safetensors are read)"
    )


def read_heads(folder: Path, where: dict[str, str], listing: Path, cfg: dict) -> tuple[dict, dict, list]:
    """The published head tensors (float32), the gate settings and the config keys that took their default."""
    defaulted = [k for k in ARMO_KEYS if k not in cfg]
    k_obj, temperature = int(cfg.get("num_objectives", 19)), float(cfg.get("gating_temperature", 10.0))
    hidden, n_hidden = int(cfg.get("gating_hidden_dim", 1024)), int(cfg.get("gating_n_hidden", 3))
    h = int(cfg["hidden_size"])
    expected = {REGRESSION: (k_obj, h), TRANSFORM: (k_obj, k_obj), SCALE: (1,)}
    for i in range(n_hidden + 1):
        rows, cols = (hidden if i < n_hidden else k_obj), (h if i == 0 else hidden)
        expected[f"gating.layers.{i}.weight"] = (rows, cols)
        expected[f"gating.layers.{i}.bias"] = (rows,)
    heads = {}
    for name, shape in expected.items():
        if name not in where:
            raise ValueError(f"{listing}: tensor {name!r} is missing (an ArmoRM checkpoint holds it)")
        file = folder / where[name]
        with safe_open(str(file), "pt") as f:
            if name not in f.keys():
                raise ValueError(f"{file}: tensor {name!r} is missing (listed in {listing.name})")
            tensor = f.get_tensor(name)
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{file}: tensor {name!r} has shape {list(tensor.shape)}, expected {list(shape)} from "
                f"config.json (hidden_size={h}, num_objectives={k_obj}, gating_hidden_dim={hidden}, "
                f"gating_n_hidden={n_hidden})"
            )
        heads[name] = tensor.float()
    extra = sorted(n for n in where if not n.startswith("model.") and n not in expected)
    if extra:
        raise ValueError(f"{listing}: tensors not in the ArmoRM layout: {extra[:5]} (n={len(extra)})")
    gate = {"hidden": hidden, "n_hidden": n_hidden, "temperature": temperature}
    return heads, gate, defaulted


def bundle_tensors(heads: dict[str, torch.Tensor], gate: dict) -> dict[str, torch.Tensor]:
    """Published names -> troupe bundle names; the gate's Linear layers map in order onto GatingNetwork's."""
    k_obj, h = heads[REGRESSION].shape
    net = GatingNetwork(h, k_obj, gate["hidden"], gate["n_hidden"], gate["temperature"], 0.0)
    linears = [n for n, m in net.layers.named_children() if isinstance(m, torch.nn.Linear)]
    out = {"regression": heads[REGRESSION], "transform": heads[TRANSFORM], SCALE: heads[SCALE]}
    for i, troupe_name in enumerate(linears):
        for part in ("weight", "bias"):
            out[f"gating.layers.{troupe_name}.{part}"] = heads[f"gating.layers.{i}.{part}"]
    return out


def backbone_config(cfg: dict) -> dict:
    """The checkpoint's config as a plain LlamaModel's: no auto_map (no remote code), no ArmoRM keys."""
    out = {k: v for k, v in cfg.items() if k != "auto_map" and k not in ARMO_KEYS}
    out["architectures"] = ["LlamaModel"]
    return out


def write_backbone(folder: Path, out: Path, where: dict[str, str], listing: Path, cfg: dict) -> dict:
    """Stream the `model.*` tensors, one source shard at a time, into a LlamaModel folder (prefix dropped)."""
    from transformers import LlamaConfig, LlamaModel

    bb_cfg = backbone_config(cfg)
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in LlamaModel(LlamaConfig(**bb_cfg)).state_dict().items()}
    have = {n.removeprefix("model."): n for n in where if n.startswith("model.")}
    missing = sorted(set(want) - set(have))
    if missing:
        raise ValueError(f"{listing}: backbone tensors missing: {['model.' + m for m in missing[:5]]}")
    unknown = sorted(set(have) - set(want))
    if unknown:
        raise ValueError(f"{listing}: tensors a LlamaModel does not have: {[have[u] for u in unknown[:5]]}")
    out.mkdir(parents=True)
    shards = sorted({where[n] for n in have.values()})
    weight_map, total, dtypes = {}, 0, set()
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        tensors = {}
        with safe_open(str(folder / shard), "pt") as f:
            present = set(f.keys())
            for short, full in have.items():
                if where[full] != shard:
                    continue
                if full not in present:
                    raise ValueError(
                        f"{folder / shard}: tensor {full!r} is missing (listed in {listing.name})"
                    )
                t = f.get_tensor(full)
                if tuple(t.shape) != want[short]:
                    raise ValueError(
                        f"{folder / shard}: {full!r} has shape {list(t.shape)}, want {list(want[short])}"
                    )
                tensors[short] = t.contiguous()
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for short, t in tensors.items():
            weight_map[short] = name
            total += t.numel() * t.element_size()
            dtypes.add(str(t.dtype).removeprefix("torch."))
        del tensors  # one shard in memory at a time
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(bb_cfg, indent=2))
    copied = [n for n in TOKENIZER_FILES if (folder / n).exists()]
    if not {"tokenizer.json", "tokenizer_config.json"} & set(copied):
        raise FileNotFoundError(f"{folder}: no tokenizer.json or tokenizer_config.json to copy")
    for n in copied:
        shutil.copy2(folder / n, out / n)
    return {"tensors": len(weight_map), "bytes": total, "dtypes": sorted(dtypes), "tokenizer_files": copied}


def _ids(out) -> list[int]:
    return list(out["input_ids"] if not isinstance(out, list) else out)


def check_positions(tokenizer, max_length: int, pad_token_id: int | None, where: str) -> None:
    """On probe chats, troupe's ids and read positions must equal the card's; else scores would differ."""
    from troupe.actors.reward.backbone import encode

    pattern = tokenizer(GATE_PATTERN, add_special_tokens=False)["input_ids"]
    for prompt, response in PROBES:
        card = _ids(tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": response}]))
        if pad_token_id is not None and pad_token_id in card:
            raise ValueError(
                f"{where}: pad_token_id {pad_token_id} occurs in a chat-templated conversation; the published "
                "forward would read the reward before it, not at the last token"
            )
        starts = [j for j in range(len(card) - len(pattern), -1, -1) if card[j : j + len(pattern)] == pattern]
        if not starts:
            raise ValueError(
                f"{where}: the published gate pattern {GATE_PATTERN!r} (ids {pattern}) is not in the chat-templated "
                "conversation: the tokenizer's chat template is not Llama-3's"
            )
        ours = encode(tokenizer, prompt, response, max_length)
        if list(ours.input_ids) != card:
            raise ValueError(
                f"{where}: troupe's token ids for a probe chat differ from the card's apply_chat_template ids "
                f"(ours ends {list(ours.input_ids[-6:])}, the card's {card[-6:]}); served scores would differ"
            )
        if ours.prompt_end != starts[0]:
            raise ValueError(
                f"{where}: troupe reads the prompt feature at token {ours.prompt_end}, the published gate at "
                f"{starts[0]}"
            )


def import_armo(checkpoint: str | Path, output: str | Path, name: str = "armo") -> tuple[Path, dict]:
    """Write the bundle (heads + `backbone/` LlamaModel folder) to `output`; returns (folder, stats)."""
    from transformers import AutoTokenizer

    folder, output = Path(checkpoint).expanduser().resolve(), Path(output).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"rm.checkpoint={str(checkpoint)!r}: no such folder")
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"rm.output={str(output)!r} exists and is not empty; give a new folder")
    cfg = read_config(folder)
    where, listing = tensor_files(folder)
    heads, gate, defaulted = read_heads(folder, where, listing, cfg)
    k_obj = heads[REGRESSION].shape[0]
    names = (
        list(PUBLISHED_OBJECTIVES)
        if k_obj == len(PUBLISHED_OBJECTIVES)
        else [f"objective_{i}" for i in range(k_obj)]
    )
    max_length = int(cfg.get("max_position_embeddings", 8192))
    output.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed in: an interrupted import never looks like a bundle.
    tmp = Path(tempfile.mkdtemp(prefix=output.name + ".", dir=output.parent))
    try:
        written = write_backbone(folder, tmp / "backbone", where, listing, cfg)
        check_positions(
            AutoTokenizer.from_pretrained(tmp / "backbone", trust_remote_code=False),
            max_length,
            cfg.get("pad_token_id"),
            str(folder),
        )
        stats = {
            "import": {
                "source": str(folder),
                "layout": "RLHFlow ArmoRM (LlamaForRewardModelWithGating)",
                "objective_names": "published" if k_obj == len(PUBLISHED_OBJECTIVES) else "generic",
                "config_defaults_used": defaulted,
                "backbone": written,
            }
        }
        info = BundleInfo(
            name=name,
            backbone="backbone",
            max_length=max_length,
            objectives=names,
            verbosity="helpsteer-verbosity" if "helpsteer-verbosity" in names else None,
            gating=gate,
            stats=stats,
        )
        tensors = bundle_tensors(heads, gate)
        BundleHeads(info, tensors)  # strict state-dict load: a mapping error fails here, not in a shard
        save_bundle(tmp, info, tensors)
        if output.exists():
            output.rmdir()
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output, stats
