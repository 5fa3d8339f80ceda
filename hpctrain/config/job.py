"""JobConfig: all sections together, plus the flat-name index that maps each field to its section."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hpctrain.config.sections import (
    SECTIONS, CheckpointConfig, DataConfig, EvalConfig, ExportConfig, LaunchConfig, LogConfig, ModelConfig,
    MoeConfig, OptimConfig, ParallelConfig, PrecisionConfig, RlhfConfig, SlurmConfig, TrainConfig, TunerConfig,
)


@dataclass
class JobConfig:
    """One job's whole configuration. ``cfg.<section>.<field>``; see sections.py for every field."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    moe: MoeConfig = field(default_factory=MoeConfig)
    tuner: TunerConfig = field(default_factory=TunerConfig)
    rlhf: RlhfConfig = field(default_factory=RlhfConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict {section: {field: value}} (deep copies; JSON-serialisable)."""
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """{field: value} over all sections (names are unique, so nothing collides)."""
        return {name: getattr(getattr(self, sec), name) for name, sec in FIELD_SECTION.items()}

    def get(self, name: str) -> Any:
        """Value of a field by flat name (``cfg.get('lr')``)."""
        return getattr(getattr(self, FIELD_SECTION[name]), name)


def _build_index() -> dict[str, str]:
    index: dict[str, str] = {}
    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name in index:
                raise AssertionError(f"config field {f.name!r} is in both [{index[f.name]}] and [{sec}]")
            index[f.name] = sec
    return index


# Flat field name -> section name. Built once; raises at import if two sections share a name.
FIELD_SECTION: dict[str, str] = _build_index()

assert [f.name for f in dataclasses.fields(JobConfig)] == list(SECTIONS), "JobConfig and SECTIONS disagree"


def section_fields(section: str) -> dict[str, dataclasses.Field]:
    """{field name: dataclasses.Field} of one section."""
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}
