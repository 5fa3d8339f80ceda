"""MicroBatchLoader: deterministic, data-parallel-sharded, resumable micro-batches.

The global sample stream is cyclic over epochs: position g is sample perm_e[g % N] of epoch
e = g // N, where perm_e is a permutation seeded by (seed, e) (identity when shuffle=False).
Global batch k covers positions [k*B, (k+1)*B) with B = micro_batch_size * dp_size; DP rank r
takes the r-th micro_batch_size slice, so ranks are disjoint and together complete. Starting at
`consumed_samples` (a count of global samples, as Megatron counts them) resumes exactly where a
run stopped. With num_workers > 0 the samples are fetched (and, for lazy datasets, tokenized) in
torch DataLoader worker processes; the order is unchanged.
"""
from __future__ import annotations

import numpy as np

from .packing import collate_packed, collate_padded
from .pretrain import collate_windows


class _Collate:
    def __init__(self, packed: bool, pad_id: int, pad_to_multiple: int, seq_len, windows: bool = False,
                 reset: bool = False):
        self.packed, self.pad_id, self.mult, self.seq_len = packed, pad_id, pad_to_multiple, seq_len
        self.windows, self.reset = windows, reset

    def __call__(self, items: list) -> dict:
        if self.windows:  # pt windows (pretrain.py): fixed length, own label shift
            return collate_windows(items, self.pad_id, self.mult, self.reset)
        if self.packed:
            return collate_packed(items, self.pad_id, self.mult, self.seq_len)
        return collate_padded(items, self.pad_id, self.mult)


class MicroBatchLoader:
    """Iterable of contract-3 micro-batch dicts for one data-parallel rank (endless; cyclic)."""

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 42,
                 consumed_samples: int = 0, pad_to_multiple: int = 1, packed: bool | None = None,
                 shuffle: bool = True, num_workers: int = 0, pad_id: int | None = None,
                 seq_len: int | None = None):
        if len(dataset) == 0:
            raise ValueError("the dataset is empty: no samples survived tokenization (see the summary above)")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
        self.dataset = dataset
        self.mbs, self.dp_rank, self.dp_size = int(micro_batch_size), int(dp_rank), int(dp_size)
        self.seed, self.shuffle, self.num_workers = int(seed), bool(shuffle), int(num_workers)
        self.consumed_samples = int(consumed_samples)
        self.packed = getattr(dataset, "packed", False) if packed is None else bool(packed)
        if self.packed and not getattr(dataset, "packed", False):
            raise ValueError("packed=True needs a packed dataset (data.packing = true)")
        pad = pad_id if pad_id is not None else getattr(dataset, "pad_id", 0)
        self.collate = _Collate(self.packed, int(pad), int(pad_to_multiple), seq_len,
                                windows=getattr(dataset, "windows", False),
                                reset=getattr(dataset, "reset_at_documents", False))
        self._perm_epoch, self._perm = -1, None

    def _sample(self, g: int) -> int:
        n = len(self.dataset)
        epoch, k = divmod(g, n)
        if not self.shuffle:
            return k
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._perm_epoch = epoch
        return int(self._perm[k])

    def index_batches(self):
        """Endless lists of dataset indices, one list per micro-batch of this rank."""
        g = self.consumed_samples
        step = self.mbs * self.dp_size
        while True:
            start = g + self.dp_rank * self.mbs
            yield [self._sample(p) for p in range(start, start + self.mbs)]
            g += step

    def __iter__(self):
        if self.num_workers > 0:
            from torch.utils.data import DataLoader

            loader = DataLoader(self.dataset, batch_sampler=self.index_batches(), collate_fn=self.collate,
                                num_workers=self.num_workers, persistent_workers=False)
            yield from loader
            return
        for idx in self.index_batches():
            yield self.collate([self.dataset[i] for i in idx])
