"""Cluster profiles: TOML files holding only a [slurm] section (partition, account, setup, ...).

Precedence: defaults < profile < the job's own [slurm] table < command-line flags, so one profile
per cluster serves every job config. Profiles shipped as examples live in slurm/profiles/.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def profile_overrides(profile: str) -> dict[tuple[str, str], Any]:
    """Typed {("slurm", field): value} from a profile file; any other section is an error."""
    from hpctrain.config import ConfigError
    from hpctrain.config.files import document_overrides, read_document

    doc, text = read_document(profile)
    other = [k for k in doc if k != "slurm"]
    if other:
        raise ConfigError(f"{profile}: a cluster profile holds only a [slurm] section, found {other}; "
                          f"put job settings in the job's config file")
    return document_overrides({"slurm": doc.get("slurm", {})}, profile, text)


def apply_profile(cfg: Any, profile: str, job_path: str | None, tokens: Sequence[str]) -> None:
    """Set the profile's [slurm] values that neither the job file nor the command line set."""
    from hpctrain.config.files import apply_overrides, read_document
    from hpctrain.config.flags import parse_overrides

    job_slurm = read_document(job_path)[0].get("slurm", {}) if job_path else {}
    explicit = {("slurm", k) for k in job_slurm} | set(parse_overrides(list(tokens)))
    apply_overrides(cfg, {k: v for k, v in profile_overrides(profile).items() if k not in explicit})
