"""Backbone features cached on disk in safetensors shards, so stage 1/2 fits and evaluations rerun without a
forward pass and an interrupted extraction resumes from the last finished shard.

A cache root (`rm.cache`) holds one sub-folder per (backbone, dtype, encoding version, max_length, texts)
fingerprint, so every stage, bundle and output key that needs the same features finds them, and different data
never collides. Each shard also stores which rows the truncation rule cut.

Cost: the rows of the shards not on disk are encoded first, so the number of tokens to process is known (and
printed, with `report`) before the first forward pass; the progress bar counts tokens, not rows (rows are sorted
by length within a shard, so a row-based rate swings with the length), and its rate and ETA are measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file


class Features(NamedTuple):
    response: torch.Tensor  # [N, d] float32
    prompt: torch.Tensor  # [N, d] float32
    cut: torch.Tensor  # [N] bool: the row was truncated to fit the backbone's max_length
    stats: dict  # folder, shards computed / reused, rows cut


def fingerprint(backbone_path: str, max_length: int, prompts, responses, dtype: str = "float32") -> str:
    from troupe.actors.reward.backbone import ENCODING_VERSION

    h = hashlib.sha256(f"{backbone_path}|{max_length}|{dtype}|encoding{ENCODING_VERSION}".encode())
    for p, r in zip(prompts, responses, strict=True):
        h.update(json.dumps(p, sort_keys=True).encode())
        h.update(b"\x00" + r.encode() + b"\x01")
    return h.hexdigest()[:24]


def cached_features(
    backbone,
    prompts: Sequence[Sequence[dict]],
    responses: Sequence[str],
    root: str | Path,
    shard_size: int = 256,
    batch_size: int = 8,
    progress: bool = False,
    report: bool = False,
) -> Features:
    """Features for every row, computing only the shards not on disk under `root/<fingerprint>/`.
    `progress`: a tqdm bar on stderr counting tokens, advanced per forward batch. `report`: print the tokens to
    process before extracting and the measured rate after it (stdout)."""
    from tqdm import tqdm

    dtype = getattr(backbone, "dtype", "float32")
    key = fingerprint(backbone.path, backbone.max_length, prompts, responses, dtype)
    folder = Path(root) / key
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.json"
    if not manifest.exists():  # what the folder holds, for a person looking at the cache
        info = {
            "backbone": backbone.path,
            "max_length": backbone.max_length,
            "dtype": dtype,
            "rows": len(responses),
        }
        manifest.write_text(json.dumps(info))
    starts = list(range(0, len(responses), shard_size))
    paths = [folder / f"shard-{i:05d}.safetensors" for i in range(len(starts))]
    todo = {  # the rows of every shard not on disk, encoded once: their token count is the cost
        i: backbone.encode_rows(prompts[lo : lo + shard_size], responses[lo : lo + shard_size])
        for i, lo in enumerate(starts)
        if not paths[i].exists()
    }
    tokens = sum(len(e.input_ids) for enc in todo.values() for e in enc)
    rows = sum(len(enc) for enc in todo.values())
    if report and todo:
        print(
            f"features: {rows} of {len(responses)} rows to compute ({len(starts) - len(todo)} of {len(starts)} "
            f"shards on disk), {tokens:,} tokens through {Path(backbone.path).name} at max_length "
            f"{backbone.max_length}; the bar shows the measured tokens/s and time left",
            flush=True,
        )
    resp, prom, cut = [], [], []
    computed = len(todo)
    started = time.perf_counter()
    bar = tqdm(
        total=tokens, desc="features", unit="tok", unit_scale=True, file=sys.stderr, disable=not progress
    )
    with bar:
        for i, path in enumerate(paths):
            if i in todo:
                _compute_shard(backbone, todo.pop(i), path, batch_size, bar)
            shard = load_file(str(path))
            resp.append(shard["response"])
            prom.append(shard["prompt"])
            cut.append(shard["cut"].bool())
    seconds = time.perf_counter() - started
    cut_rows = torch.cat(cut) if cut else torch.zeros(0, dtype=torch.bool)
    stats = {
        "folder": str(folder),
        "shards": len(resp),
        "computed": computed,
        "reused": len(resp) - computed,
        "rows_cut": int(cut_rows.sum()),
        "tokens_computed": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1) if computed and seconds > 0 else None,
    }
    if report and computed:
        print(
            f"features: {tokens:,} tokens in {seconds:.0f}s ({stats['tokens_per_s']:,.0f} tokens/s)",
            flush=True,
        )
    if not resp:
        empty = torch.zeros(0, getattr(backbone, "hidden_size", 0))
        return Features(empty, empty, cut_rows, stats)
    return Features(torch.cat(resp), torch.cat(prom), cut_rows, stats)


def _compute_shard(backbone, enc, path: Path, batch_size: int, bar) -> None:
    order = sorted(range(len(enc)), key=lambda j: len(enc[j].input_ids))  # length-sorted: little padding
    resp = torch.zeros(len(enc), backbone.hidden_size)
    prom = torch.zeros(len(enc), backbone.hidden_size)
    for lo in range(0, len(order), batch_size):
        rows = order[lo : lo + batch_size]
        resp[rows], prom[rows] = backbone.features_of([enc[j] for j in rows], batch_size)
        bar.update(sum(len(enc[j].input_ids) for j in rows))  # tokens: the cost, whatever the row lengths
    cut = torch.tensor([e.cut for e in enc], dtype=torch.uint8)
    tmp = path.with_suffix(".tmp")
    save_file({"response": resp.contiguous(), "prompt": prom.contiguous(), "cut": cut}, str(tmp))
    os.replace(tmp, path)  # a shard is either complete on disk or absent
