"""`troupe rm import rm.checkpoint=<folder> rm.output=<bundle dir> [rm.name=armo]`: turn a checkpoint laid out
like RLHFlow/ArmoRM-Llama3-8B-v0.1 (a local folder) into a reward bundle that `reward.experts.<name>.bundle` serves.
No Ray, no remote code: the tensors are read from safetensors (actors/reward/armo_import.py).
"""

from __future__ import annotations

import json

from troupe.cluster.config.schema import TroupeConfig
from troupe.cluster.observe.metrics import RM_COLUMNS
from troupe.cluster.run.job import Job


def run_rm_import(cfg: TroupeConfig) -> dict:
    from troupe.actors.reward.armo_import import import_armo

    rm = cfg.rm
    with Job(cfg, RM_COLUMNS) as job:
        folder, stats = import_armo(rm.checkpoint, rm.output, rm.name)
        print(f"reward bundle: {folder}\n{json.dumps(stats, indent=2, default=str)}", flush=True)
        return job.finish(bundle=folder) | {"stats": stats}
