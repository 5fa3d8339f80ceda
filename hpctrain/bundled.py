"""Files the README and the CLI point at (sbatch templates, cluster profiles, user docs), wherever
hpctrain is installed.

A wheel carries them under hpctrain/assets/{slurm,docs} (setup.py copies them in at build time);
a source checkout (editable install, PYTHONPATH) has them at the repository's slurm/ and docs/.
The repository copy is the single source: nothing under hpctrain/assets is edited by hand.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parent
FOLDERS = ("slurm", "docs")


def bundled(relative: str) -> Path:
    """The installed file or folder ``slurm/...`` or ``docs/...``; FileNotFoundError when neither copy exists."""
    folder = relative.split("/", 1)[0]
    if folder not in FOLDERS:
        raise ValueError(f"bundled(): {relative!r} is not under {' or '.join(FOLDERS)}")
    for base in (PACKAGE / "assets", REPO):
        path = base / relative
        if path.exists():
            return path
    raise FileNotFoundError(f"{relative} is neither in {PACKAGE / 'assets'} (a wheel install) nor in {REPO} "
                            "(a source checkout): reinstall hpctrain")


def config_reference() -> Path:
    """docs/config.md: the config syntax and every key with type, default and meaning."""
    return bundled("docs/config.md")
