"""troupe: distributed, Ray actor-based RLHF. The Python API; the `troupe` command is the same thing on a shell.

    import troupe

    result = troupe.train("model.policy=builtin:tiny-llama", "run.iterations=2", recipe="demo")
    print(result["metrics"], result["checkpoint"])

    cfg = troupe.compose("data.train=prompts.jsonl", "data.prompt_key=question")  # a typed TroupeConfig
    cfg.learner.lr = 1e-6
    cfg.algo.estimator = my_estimator  # where the config takes an import path, the object itself works too
    troupe.train(cfg)

Jobs: `train` (RL), `dpo` (offline DPO), `rm.train`, `rm.eval`, `rm.serve`, `rm.import_checkpoint`, `best_of_n`.
Each takes overrides (strings, as on the command line, with `recipe=` for `--config-name`) or a typed config.
The installed packages: troupe.actors (the Ray actors and their math), troupe.cluster (the driver side), and
troupe.conf (the recipes).
"""

from troupe.cluster.api import best_of_n, compose, dpo, rm, train

__all__ = ["best_of_n", "compose", "dpo", "rm", "train"]
__version__ = "0.1.0"
