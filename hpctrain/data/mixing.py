"""Mix several datasets into one ordered list of (source, row) references, and split validation.

Only row numbers live here (two int arrays), never row contents, so a plan over hundreds of
millions of rows stays small. Every random choice is seeded from (seed, purpose, dataset index),
so the same options always give the same plan.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .options import DataOptions
from .sources import open_source, parse_spec, sample_rows

log = logging.getLogger(__name__)

_SAMPLE, _SHUFFLE, _SPLIT, _VAL_SHUFFLE = 1, 2, 3, 4


@dataclass
class RowPlan:
    """rows[k] is row ``row[k]`` of ``sources[src[k]]``."""

    sources: list
    src: np.ndarray
    row: np.ndarray

    def __len__(self) -> int:
        return len(self.src)

    def take(self, idx: np.ndarray) -> "RowPlan":
        return RowPlan(self.sources, self.src[idx], self.row[idx])

    def get(self, k: int) -> tuple[dict, str]:
        """(raw row, its location) for plan entry k; raises DataError for unreadable rows."""
        s = self.sources[int(self.src[k])]
        r = int(self.row[k])
        return s.get(r), s.where(r)

    def where(self, k: int) -> str:
        return self.sources[int(self.src[k])].where(int(self.row[k]))


def mix(specs: list, seed: int, shuffle: bool, salt: int = 0) -> RowPlan:
    """Open every spec, sample '#N' rows from each and concatenate (shuffled when asked)."""
    sources, srcs, rows = [], [], []
    for i, raw in enumerate(specs):
        spec = parse_spec(raw)
        source = open_source(spec)
        picked = sample_rows(len(source), spec.count, np.random.default_rng([seed, _SAMPLE, salt, i]))
        log.info("dataset %s: %d rows available, %d taken", spec.raw, len(source), len(picked))
        sources.append(source)
        srcs.append(np.full(len(picked), i, dtype=np.int32))
        rows.append(picked)
    src = np.concatenate(srcs) if srcs else np.zeros(0, np.int32)
    row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    plan = RowPlan(sources, src, row)
    if shuffle and len(plan):
        plan = plan.take(np.random.default_rng([seed, _SHUFFLE, salt]).permutation(len(plan)))
    return plan


def build_row_plans(opts: DataOptions) -> tuple[RowPlan, RowPlan | None]:
    """(train, valid) plans. Validation is val_dataset when given, else split_dataset_ratio of the
    sampled training rows (taken at random, seeded), else None."""
    if not opts.dataset:
        raise ValueError("data.dataset is empty: name at least one dataset, e.g. "
                         "dataset = [\"alpaca_gpt4_en.jsonl#500\"]")
    train = mix(opts.dataset, opts.seed, opts.dataset_shuffle, salt=0)
    if opts.val_dataset:
        if opts.split_dataset_ratio:
            log.info("val_dataset given: split_dataset_ratio=%s is not applied", opts.split_dataset_ratio)
        return train, mix(opts.val_dataset, opts.seed, opts.val_dataset_shuffle, salt=1)
    ratio = float(opts.split_dataset_ratio)
    if ratio <= 0 or len(train) < 2:
        return train, None
    n_val = min(len(train) - 1, max(1, int(round(len(train) * ratio))))
    perm = np.random.default_rng([opts.seed, _SPLIT]).permutation(len(train))
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    if opts.val_dataset_shuffle:
        val_idx = val_idx[np.random.default_rng([opts.seed, _VAL_SHUFFLE]).permutation(n_val)]
    return train.take(train_idx), train.take(val_idx)
