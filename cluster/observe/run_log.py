"""Where a run's logs go: the console shows only troupe's lines (table, progress bar, paths, warnings); other
libraries' logs go to files under <run dir>/logs/. Metrics go to the trackers (cluster/observe/trackers.py).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

CONSOLE_LOGGERS = ("troupe",)
OWN_HANDLER_LOGGERS = ("ray",)  # libraries that print through their own handlers, bypassing the root logger


class _TroupeWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] in CONSOLE_LOGGERS and record.levelno >= logging.WARNING


def route_driver_logs(log_dir: Path):
    """Root logging -> <log_dir>/driver.log (INFO and up); the console keeps troupe's warnings only.
    Returns a function that puts the previous handlers back (a process may run several jobs)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "driver.log"
    root = logging.getLogger()
    saved, saved_level = list(root.handlers), root.level
    for handler in saved:
        root.removeHandler(handler)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("troupe: %(levelname)s: %(message)s"))
    console.addFilter(_TroupeWarnings())
    root.addHandler(to_file)
    root.addHandler(console)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # Python warnings from libraries go to the file too
    own = {
        name: (logging.getLogger(name), list(logging.getLogger(name).handlers))
        for name in OWN_HANDLER_LOGGERS
    }
    for logger, handlers in own.values():
        for handler in handlers:
            logger.removeHandler(handler)
        logger.propagate = True

    def restore() -> None:
        for logger, handlers in own.values():
            for handler in handlers:
                logger.addHandler(handler)
            logger.propagate = False
        for handler in (to_file, console):
            root.removeHandler(handler)
        to_file.close()
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(saved_level)
        logging.captureWarnings(False)

    return restore


def link_ray_logs(log_dir: Path) -> Path | None:
    """<log_dir>/ray -> this Ray session's log folder (actors' stdout/stderr: vLLM, DeepSpeed), when local."""
    try:
        import ray

        session_logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # no public accessor
    except Exception:  # a client connection has no local session folder
        return None
    log_dir.mkdir(parents=True, exist_ok=True)  # with logging.quiet=false nothing else made it
    link = log_dir / "ray"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(session_logs, target_is_directory=True)
    return link


# {"wandb": {"id", "project"}, "mlflow": {"run_id", "tracking_uri", "experiment"}}
