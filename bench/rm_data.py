"""The public data folder beside the checkout, and the converters (now `troupe.cluster.data.rm_data`, the
`troupe rm data` command) re-exported for the benchmarks."""

from __future__ import annotations

from pathlib import Path

from troupe.cluster.data.rm_data import (  # noqa: F401
    SCALES,
    VERBOSITY_CAP,
    hh_pairs,
    pandalm_pairs,
    ratings_rows,
    scales,
    split,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
