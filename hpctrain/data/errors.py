"""Errors raised for bad datasets, and the tally of rows skipped when ``strict = false``.

Every error names where the problem is (``file:line`` for JSON lines, ``file row N`` otherwise)
and, where it can, how to fix it. With ``strict = false`` a bad row is skipped instead, counted
by reason, and :meth:`SkipTally.summary` produces the one line the pipeline logs, so nothing is
dropped silently.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


class DataError(ValueError):
    """A dataset, row or option the data pipeline cannot use. The message says where and why."""

    def __init__(self, message: str, reason: str = "bad row"):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # survive pickling across worker processes with the reason intact
        return (DataError, (str(self), self.reason))


@dataclass
class SkipTally:
    """Counts of rows left out, by reason, with the first few messages kept as examples."""

    counts: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)
    max_examples: int = 3

    def add(self, reason: str, message: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(message)

    def merge(self, other: "SkipTally") -> None:
        self.counts.update(other.counts)
        for m in other.examples:
            if len(self.examples) < self.max_examples:
                self.examples.append(m)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self, of_rows: int, what: str = "rows") -> str:
        """One line: '3 of 2000 rows skipped (empty assistant turn: 2, malformed JSON: 1); first: ...'."""
        if not self.total:
            return f"0 of {of_rows} {what} skipped"
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
        first = " | ".join(self.examples)
        return f"{self.total} of {of_rows} {what} skipped ({parts}); first: {first}"

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": list(self.examples)}
