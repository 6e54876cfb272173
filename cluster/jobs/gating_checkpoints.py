"""Run checkpoints of the gating stage (`rm train rm.stage=gating`, ArmoRM stage 2), whose loop
(`actors.reward.armo.train_gating`) runs `rm.gating_steps` AdamW steps on cached features in this process.

Every `run.checkpoint_every` steps, `<rm.output>.train/checkpoints/iter-NNNNNN/` (durability/checkpoint.py: tmp
folder, signed manifest, swap in) gets `train.safetensors`, every tensor of the gate's parameters, the AdamW and
cosine schedule states and the RNG streams (dropout's and the batch sampler's), and `state.json`: the step, the
losses so far, the JSON rest of those states (`tensor_state.split`), the run id and fingerprint. Nothing in it is
a pickle, and it is still loaded only after `verify`. `resume=latest` continues at the next step and ends with the
parameters the uninterrupted run ends with.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from troupe.cluster.config.schema import TroupeConfig
from troupe.cluster.durability.checkpoint import checkpoints_root, complete, write_checkpoint
from troupe.cluster.durability.fingerprint import resume_point
from troupe.cluster.durability.run_folder import RunFolderError, claim
from troupe.cluster.durability.stop_signal import Stopped, watch_stop_signals
from troupe.cluster.durability.tensor_state import join, split

TENSORS = "train.safetensors"
log = logging.getLogger("troupe.checkpoint")


def train_folder(bundle: str | Path) -> Path:
    """Where the gating stage writing `bundle` keeps its checkpoints (and run.json): `<bundle>.train`."""
    bundle = Path(bundle).expanduser().resolve()
    return bundle.with_name(bundle.name + ".train")


class GatingCheckpoints:
    """What `train_gating` calls: `restore` before the first step, `due` and `save` after each step. A stop signal
    (SIGTERM/SIGINT, durability/stop_signal.py) makes the step it arrived in due; `save` then raises `Stopped`."""

    def __init__(self, out_dir: Path, every: int, keep: int, identity: dict, resume=None) -> None:
        self.out_dir, self.every, self.keep, self.identity = Path(out_dir), every, keep, identity
        self.resume = resume  # (verified folder, its state) or None
        self.last: Path | None = None
        self.stop_signal: int | None = None

    def watch_signals(self):
        return watch_stop_signals(self)

    def restore(self, gate, opt, sched, sampler: torch.Generator) -> tuple[int, list[float]]:
        """(first step to take, losses so far): the checkpoint's, or (0, []) for a fresh run."""
        if self.resume is None:
            return 0, []
        folder, state = self.resume
        loaded = join(state["train"], load_file(str(folder / TENSORS)))
        gate.load_state_dict(loaded["gate"])
        opt.load_state_dict(loaded["optimizer"])
        sched.load_state_dict(loaded["scheduler"])
        torch.set_rng_state(loaded["rng"]["torch"])
        sampler.set_state(loaded["rng"]["sampler"])
        if "cuda" in loaded["rng"]:
            torch.cuda.set_rng_state(loaded["rng"]["cuda"])
        log.warning("gating: resumed from %s at step %d", folder, state["iteration"] + 1)
        return state["iteration"] + 1, list(state["losses"])

    def due(self, step: int) -> bool:
        return self.stop_signal is not None or (self.every > 0 and (step + 1) % self.every == 0)

    def save(self, step: int, gate, opt, sched, sampler: torch.Generator, losses: list[float]) -> Path:
        rng = {"torch": torch.get_rng_state(), "sampler": sampler.get_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state()
        whole = {
            "gate": gate.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": rng,
        }
        skeleton, tensors = split(whole, "train")
        state = {"iteration": step, "losses": losses, "train": skeleton, **self.identity}
        self.last, written = write_checkpoint(
            self.out_dir, step, lambda tmp: save_file(tensors, str(tmp / TENSORS)), state, self.keep
        )
        log.info("checkpoint %s (%.1f MB in %.1fs)", self.last, written["bytes"] / 1e6, written["write_s"])
        if self.stop_signal is not None:
            raise Stopped(self.stop_signal, self.last)
        return self.last


def gating_checkpoints(cfg: TroupeConfig, job) -> GatingCheckpoints:
    """The stage's checkpoints (every run.checkpoint_every steps, and on a stop signal), its folder held by this
    process for the job. A fresh run refuses a folder with an earlier run's checkpoints unless run.overwrite."""
    out_dir = train_folder(cfg.rm.output)
    job.on_exit(claim(out_dir), "release")
    earlier = complete(checkpoints_root(out_dir))
    if earlier and not cfg.resume:
        if not cfg.run.overwrite:
            raise RunFolderError(
                f"{checkpoints_root(out_dir)} holds checkpoints of an earlier gating run ({earlier[-1].name}): "
                "continue it with resume=latest, start over with run.overwrite=true (deletes them), or give this "
                "stage another rm.output"
            )
        shutil.rmtree(checkpoints_root(out_dir))
    resume, identity = resume_point(cfg, out_dir)
    checkpoints = GatingCheckpoints(
        out_dir, cfg.run.checkpoint_every, cfg.run.keep_checkpoints, identity, resume
    )
    job.on_exit(checkpoints.watch_signals(), "__call__")  # the stage runs in this process, without Ray
    return checkpoints
