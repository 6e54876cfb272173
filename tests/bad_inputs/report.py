"""The bad-input table: every case of the corpus run against the real loaders and validators, with its outcome
(clear error / counted skip / crash / silent / wrong message) and totals per outcome. PENDING config cases (not
refused yet) and cases that cannot run here (HTTP without rm_http) are listed and counted apart.

    python tests/bad_inputs/report.py            # a markdown table, then the totals
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, so `tests.` imports as a script
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.bad_inputs.runner import NotRun, load_cases, run_case  # noqa: E402

OUTCOMES = ("clear error", "counted skip", "crash", "silent", "wrong message")


def main() -> int:
    rows, totals, apart = [], Counter(), Counter()
    for case in load_cases():
        with tempfile.TemporaryDirectory() as tmp:
            try:
                outcome, said = run_case(case, Path(tmp))
            except NotRun as e:
                outcome, said = "not run", str(e)
        label = f"PENDING {case.id}" if case.pending else case.id
        (apart if case.pending or outcome == "not run" else totals)[outcome] += 1
        rows.append(
            (case.kind, label, case.expected, outcome, said.replace("|", "/").replace("\n", " ")[:100])
        )
    print("| kind | case | expected | outcome | what happened |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n{sum(totals.values())} cases run: " + ", ".join(f"{o} {totals[o]}" for o in OUTCOMES))
    if apart:
        print(
            "apart (PENDING config checks, HTTP cases not run here): "
            + ", ".join(f"{o} {n}" for o, n in apart.items())
        )
    bad = totals["crash"] + totals["silent"] + totals["wrong message"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
