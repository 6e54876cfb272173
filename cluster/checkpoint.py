"""Atomic HF-format checkpoints: written to a temp folder by learner rank 0, then renamed into place.

The folder loads with transformers `from_pretrained` and with vLLM; `troupe_state.json` records where the run was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from cluster.learner_group import LearnerGroup


def save_hf_checkpoint(learners: LearnerGroup, target: Path, tokenizer_path: str, state: dict) -> Path:
    target = target.resolve()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    learners.save_hf(str(tmp), tokenizer_path)
    (tmp / "troupe_state.json").write_text(json.dumps(state, indent=2, sort_keys=True, default=str))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target
