"""Tokenize a row plan: eagerly into shards (dataset_num_proc worker processes, progress lines),
or lazily, one sample at a time in the loader's workers.

Workers are forked with the plan and the encoder already in memory and each tokenizes a
contiguous chunk of plan entries; the parent writes the chunks to the shards in plan order, so
the result does not depend on the number of workers and at most a few chunks are in memory.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os

import numpy as np

from ..progress import Progress
from .errors import DataError, SkipTally
from .mixing import RowPlan
from .shards import ShardWriter
from .template import EncodeStats, Encoder

log = logging.getLogger(__name__)
CHUNK = 512
_STATE: dict = {}


def _read(plan: RowPlan, k: int):
    try:
        return plan.get(k)
    except DataError as e:
        return e, plan.where(k)


def _encode_chunk(bounds: tuple[int, int]):
    plan, enc = _STATE["plan"], _STATE["encoder"]
    tally, stats = SkipTally(), EncodeStats()
    rows = [_read(plan, k) for k in range(*bounds)]
    out = enc.encode_batch(rows, tally, stats)
    kept = [r for r in out if r is not None]
    lengths = np.array([len(r[0]) for r in kept], dtype=np.int64)
    ids = np.concatenate([r[0] for r in kept]) if kept else np.zeros(0, np.uint32)
    mask = np.concatenate([r[1] for r in kept]) if kept else np.zeros(0, np.uint8)
    return ids, mask, lengths, tally, stats


def tokenize_to_shards(plan: RowPlan, encoder: Encoder, directory, num_proc: int = 1,
                       desc: str = "tokenize") -> tuple[np.ndarray, SkipTally, EncodeStats]:
    """Tokenize every plan entry into shards under `directory`. Returns (index, tally, stats)."""
    writer = ShardWriter(directory)
    tally, stats = SkipTally(), EncodeStats()
    chunks = [(a, min(a + CHUNK, len(plan))) for a in range(0, len(plan), CHUNK)]
    _STATE.update(plan=plan, encoder=encoder)
    try:
        with Progress(len(plan), f"tokenize {desc}", "rows") as bar:
            if num_proc > 1 and len(chunks) > 1:
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
                with mp.get_context("fork").Pool(num_proc) as pool:
                    _drain(pool.imap(_encode_chunk, chunks, chunksize=1), writer, tally, stats, bar)
            else:
                _drain(map(_encode_chunk, chunks), writer, tally, stats, bar)
    finally:
        _STATE.clear()
    index = writer.close()
    return index, tally, stats


def _drain(results, writer: ShardWriter, tally: SkipTally, stats: EncodeStats, bar) -> None:
    for ids, mask, lengths, t, s in results:
        pos = 0
        for n in lengths:
            writer.add(ids[pos:pos + n], mask[pos:pos + n])
            pos += int(n)
        tally.merge(t)
        stats.merge(s)
        bar.update(s.rows)


class LazyDataset:
    """lazy_tokenize = true: plan entry i is read and tokenized when the loader asks for it.

    A row that cannot be used (bad, or too long with truncation 'delete') is replaced by the next
    usable entry, and counted in `skipped` (per process; a warning names each one)."""

    packed = False

    def __init__(self, plan: RowPlan, encoder: Encoder, pad_id: int):
        self.plan, self.encoder, self.pad_id = plan, encoder, int(pad_id)
        self.skipped = SkipTally()
        self.stats = EncodeStats()

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int):
        for step in range(len(self.plan)):
            k = (int(i) + step) % len(self.plan)
            tally, seen = SkipTally(), self.stats.placeholder_rows
            (res,) = self.encoder.encode_batch([_read(self.plan, k)], tally, self.stats)
            if self.stats.placeholder_rows > seen:
                log.warning("lazy_tokenize: %s still holds a {{...}} placeholder after filling "
                            "{{NAME}}/{{AUTHOR}} (the model would learn the braces)", self.plan.where(k))
            if res is not None:
                return res
            reason = next(iter(tally.counts), "too long / no loss tokens")
            self.skipped.add(reason, tally.examples[0] if tally.examples else self.plan.where(k))
            log.warning("lazy_tokenize: %s skipped (%s); using the next row", self.plan.where(k), reason)
        raise DataError("lazy_tokenize: no usable row in the dataset", "no usable rows")
