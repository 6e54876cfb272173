"""Backbone features cached on disk in safetensors shards, so stage 1/2 fits rerun without a forward pass and
an interrupted extraction resumes from the last finished shard.

A cache folder belongs to one (backbone, dtype, encoding version, max_length, texts) fingerprint; a mismatch is an
error, not a reuse.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def fingerprint(backbone_path: str, max_length: int, prompts, responses, dtype: str = "float32") -> str:
    from actors.reward.backbone import ENCODING_VERSION

    h = hashlib.sha256(f"{backbone_path}|{max_length}|{dtype}|encoding{ENCODING_VERSION}".encode())
    for p, r in zip(prompts, responses, strict=True):
        h.update(json.dumps(p, sort_keys=True).encode())
        h.update(b"\x00" + r.encode() + b"\x01")
    return h.hexdigest()[:24]


def cached_features(
    backbone,
    prompts: Sequence[Sequence[dict]],
    responses: Sequence[str],
    folder: str | Path,
    shard_size: int = 256,
    batch_size: int = 8,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(response_features, prompt_features, stats) for every row, computing only the shards not on disk."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = fingerprint(
        backbone.path, backbone.max_length, prompts, responses, getattr(backbone, "dtype", "float32")
    )
    manifest = folder / "manifest.json"
    if manifest.exists():
        have = json.loads(manifest.read_text())
        if have["fingerprint"] != key:
            raise ValueError(
                f"{folder}: feature cache was built for other data or backbone "
                f"({have['backbone']}, {have['rows']} rows); use another folder"
            )
    else:
        manifest.write_text(
            json.dumps({"fingerprint": key, "backbone": backbone.path, "rows": len(responses)})
        )
    resp, prom, computed = [], [], 0
    for i, lo in enumerate(range(0, len(responses), shard_size)):
        path = folder / f"shard-{i:05d}.safetensors"
        if not path.exists():
            r, p = backbone.features(
                prompts[lo : lo + shard_size], responses[lo : lo + shard_size], batch_size
            )
            tmp = path.with_suffix(".tmp")
            save_file({"response": r.contiguous(), "prompt": p.contiguous()}, str(tmp))
            os.replace(tmp, path)  # a shard is either complete on disk or absent
            computed += 1
        shard = load_file(str(path))
        resp.append(shard["response"])
        prom.append(shard["prompt"])
    stats = {"shards": len(resp), "computed": computed, "reused": len(resp) - computed}
    return torch.cat(resp), torch.cat(prom), stats
