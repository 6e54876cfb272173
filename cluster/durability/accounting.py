"""Where every prompt went: each prompt the data cursor serves ends as trained, retried (its iteration was rolled
back to a checkpoint and the cursor serves it again) or dropped with a reason. Nothing is lost:
entered = trained + retried + dropped + in flight, checked by the tests and reported in every row and the summary.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Ledger:
    entered: int = 0
    trained: int = 0
    retried: int = 0
    dropped: Counter = field(default_factory=Counter)
    in_flight: int = 0  # entered in the current iteration, not yet settled

    def enter(self, n: int) -> None:
        self.entered += n
        self.in_flight += n

    def settle(self, dropped: dict[str, int] | None = None) -> dict:
        """The iteration's prompts are done: all trained but `dropped` ({reason: count}). Returns its metrics."""
        dropped = {k: v for k, v in (dropped or {}).items() if v}
        n, gone = self.in_flight, sum(dropped.values())
        if gone > n:
            raise ValueError(f"{gone} prompts dropped of {n} in this iteration")
        self.trained += n - gone
        self.dropped.update(dropped)
        self.in_flight = 0
        row = {"prompts/entered": n, "prompts/trained": n - gone}
        row.update({f"prompts/dropped/{k}": v for k, v in dropped.items()})
        return {**row, **self.totals()}

    def roll_back(self, rows: list[dict]) -> int:
        """Rows of iterations undone by a rollback, plus the iteration in flight, become retried."""
        moved = self.in_flight
        for row in rows:
            self.trained -= row.get("prompts/trained", 0)
            for key, value in row.items():
                if key.startswith("prompts/dropped/"):
                    self.dropped[key.removeprefix("prompts/dropped/")] -= value
            moved += row.get("prompts/entered", 0)
        self.dropped = +self.dropped  # drop zero counts
        self.retried += moved
        self.in_flight = 0
        return moved

    def resumed(self, rows: list[dict]) -> int:
        """A resume restored this ledger from a checkpoint; rows written after it (by the run that stopped) are
        work done again: entered there, retried here."""
        n = sum(row.get("prompts/entered", 0) for row in rows)
        self.entered += n
        self.retried += n
        return n

    def totals(self) -> dict:
        dropped = sum(self.dropped.values())
        return {
            "accounting/entered": self.entered,
            "accounting/trained": self.trained,
            "accounting/retried": self.retried,
            "accounting/dropped": dropped,
            "accounting/in_flight": self.in_flight,
            "accounting/lost": self.entered - self.trained - self.retried - dropped - self.in_flight,
        }

    def summary(self) -> dict:
        return {**self.totals(), "dropped_by_reason": dict(self.dropped)}

    def state_dict(self) -> dict:
        return {
            "entered": self.entered,
            "trained": self.trained,
            "retried": self.retried,
            "dropped": dict(self.dropped),
        }

    def load_state_dict(self, state: dict) -> None:
        self.entered, self.trained, self.retried = state["entered"], state["trained"], state["retried"]
        self.dropped, self.in_flight = Counter(state["dropped"]), 0
