"""The data options the pipeline reads, gathered from a JobConfig into one small dataclass.

The pipeline depends only on :class:`DataOptions`, so it can be driven from a ``JobConfig``
(:meth:`DataOptions.from_config`) or built directly in tests and tools. Field names and
defaults follow Megatron-SWIFT's data arguments.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

TRUNCATION_STRATEGIES = ("delete", "left", "right")


@dataclass
class DataOptions:
    dataset: list = field(default_factory=list)
    """Dataset specs 'path[:subset][#N]' (local files/dirs, bundled aliases or hub names)."""
    val_dataset: list = field(default_factory=list)
    """Validation dataset specs; when given, split_dataset_ratio is not applied."""
    split_dataset_ratio: float = 0.0
    """Fraction of the sampled training rows moved to validation."""
    dataset_shuffle: bool = True
    """Shuffle the mixed rows (seeded) before splitting and tokenizing."""
    val_dataset_shuffle: bool = False
    """Shuffle the validation rows (seeded); else they keep the order of val_dataset / of the split."""
    columns: dict | None = None
    """Rename row keys before the format is detected: {"name in the file": "name the formats read"}."""
    seed: int = 42
    max_length: int = 2048
    """Longest sample in tokens; longer ones follow truncation_strategy."""
    truncation_strategy: str = "delete"
    """delete (drop and count), left (keep the end) or right (keep the start)."""
    system: str | None = None
    """Default system prompt; a row's own system prompt wins over it."""
    model_name: list = field(default_factory=list)
    """Self-cognition {{NAME}}: one value, or [zh, en]."""
    model_author: list = field(default_factory=list)
    """Self-cognition {{AUTHOR}}: one value, or [zh, en]."""
    dataset_num_proc: int = 1
    packing: bool = False
    packing_length: int | None = None
    """Bin capacity in tokens when packing (default: max_length)."""
    lazy_tokenize: bool = False
    num_workers: int = 0
    strict: bool = False
    """True: the first bad row is an error. False: bad rows are skipped, counted and reported."""
    prep_dir: str | None = None
    """Directory of pre-tokenised shards written by `hpctrain prep`."""
    mode: str = "sft"
    """sft (loss on assistant turns) or pt (loss on every token)."""
    seq_length: int | None = None
    """pt mode: window length S (inputs per sample); None = max_length. Unused in sft."""

    def __post_init__(self):
        if isinstance(self.dataset, str):
            self.dataset = [self.dataset]
        if isinstance(self.val_dataset, str):
            self.val_dataset = [self.val_dataset]
        for name in ("model_name", "model_author"):
            v = getattr(self, name)
            setattr(self, name, [v] if isinstance(v, str) else list(v or []))
        if self.truncation_strategy not in TRUNCATION_STRATEGIES:
            raise ValueError(f"data.truncation_strategy={self.truncation_strategy!r}: "
                             f"choose one of {', '.join(TRUNCATION_STRATEGIES)}")
        if self.mode not in ("sft", "pt"):
            raise ValueError(f"data mode {self.mode!r}: choose 'sft' or 'pt'")
        if not 0.0 <= float(self.split_dataset_ratio) < 1.0:
            raise ValueError(f"data.split_dataset_ratio={self.split_dataset_ratio}: must be in [0, 1)")
        if self.max_length is None or int(self.max_length) < 2:
            raise ValueError(f"data.max_length={self.max_length}: must be an integer >= 2")
        if self.packing and self.lazy_tokenize:
            raise ValueError("data.packing = true needs the lengths of every sample before training: "
                             "set data.lazy_tokenize = false (or run `hpctrain prep`)")
        if self.mode == "pt" and self.lazy_tokenize:
            raise ValueError("pt mode cuts fixed windows across documents, which needs every document's "
                             "length before training: set data.lazy_tokenize = false (or run `hpctrain prep`)")
        if self.seq_length is not None and int(self.seq_length) < 1:
            raise ValueError(f"data.seq_length={self.seq_length}: must be an integer >= 1")
        if self.dataset_num_proc < 1:
            raise ValueError(f"data.dataset_num_proc={self.dataset_num_proc}: must be >= 1")

    @property
    def capacity(self) -> int:
        """Tokens per packed row."""
        return int(self.packing_length or self.max_length)

    @property
    def window(self) -> int:
        """pt mode: tokens of input per window (each window holds window + 1 tokens)."""
        return int(self.seq_length or self.max_length)

    @classmethod
    def from_config(cls, cfg, mode: str = "sft") -> "DataOptions":
        """Pick the data fields out of a JobConfig (cfg.data; seed = data.data_seed; max_length
        falls back to data.seq_length, then model.max_position_embeddings)."""
        data = cfg.data
        kw = {f.name: getattr(data, f.name) for f in dataclasses.fields(cls)
              if f.name not in ("seed", "mode") and hasattr(data, f.name)}
        if kw.get("max_length") is None:
            model = getattr(cfg, "model", None)
            kw["max_length"] = getattr(data, "seq_length", None) or \
                getattr(model, "max_position_embeddings", None) or 2048
        for name in ("model_name", "model_author", "dataset", "val_dataset"):
            if kw.get(name) is None:
                kw[name] = []
        seed = getattr(data, "data_seed", None)
        if seed is None:
            seed = getattr(getattr(cfg, "train", None), "seed", None) or 42
        return cls(**kw, seed=int(seed), mode=mode)
