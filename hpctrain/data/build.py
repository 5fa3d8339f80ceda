"""build_train_valid: the trainer's one call to get its datasets."""
from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
from pathlib import Path

from .errors import DataError
from .mixing import build_row_plans
from .options import DataOptions
from .pipeline import LazyDataset
from .prep import _encoder, check_reusable, fingerprint, open_prepared, pad_id_of, prepare

log = logging.getLogger(__name__)


def build_train_valid(cfg, tokenizer, mode: str = "sft", tokenizer_source: str | None = None):
    """(train_dataset, valid_dataset or None) for a JobConfig (or DataOptions).

    - data.prep_dir set: memory-map the shards `hpctrain prep` wrote, after checking they were
      made from this config (a mismatch is an error listing what changed; a missing directory is
      an error telling to run prep first).
    - lazy_tokenize: rows are read and tokenized in the loader's workers (LazyDataset).
    - otherwise: tokenize now (dataset_num_proc workers) into shards in a temporary directory.
    Datasets are TokenDataset / PackedDataset / LazyDataset; feed them to MicroBatchLoader.
    """
    opts = cfg if isinstance(cfg, DataOptions) else DataOptions.from_config(cfg, mode)
    if tokenizer_source is None and not isinstance(cfg, DataOptions):
        tokenizer_source = getattr(getattr(cfg, "model", None), "model", None)
    if opts.prep_dir:
        out = Path(opts.prep_dir)
        if not out.exists():
            raise DataError(f"data.prep_dir {out} does not exist: run `hpctrain prep CONFIG` once (one process) "
                            "before training", "prep")
        check_reusable(out, fingerprint(opts, tokenizer, tokenizer_source))
        log.info("data: memory-mapping shards from %s", out)
        return open_prepared(out)
    if opts.lazy_tokenize:
        train_plan, valid_plan = build_row_plans(opts)
        enc, pad = _encoder(opts, tokenizer), pad_id_of(tokenizer)
        return LazyDataset(train_plan, enc, pad), (LazyDataset(valid_plan, enc, pad) if valid_plan else None)
    tmp = Path(tempfile.mkdtemp(prefix="hpctrain-data-"))
    atexit.register(shutil.rmtree, tmp, True)
    prepare(opts, tokenizer, tmp / "shards", tokenizer_source)
    return open_prepared(tmp / "shards")
