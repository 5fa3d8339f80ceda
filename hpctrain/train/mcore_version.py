"""Which megatron-core versions hpctrain runs on (no torch import: `hpctrain doctor` reads it too).

0.16.1 is the last release with a Python 3.11 wheel (the CI machine); 0.17 to 0.19.2 need Python
3.12 (the GPU machines). Both ends are tested: see docs/compat.md for what ran on each.
"""
from __future__ import annotations

SUPPORTED = ">=0.16.1,<0.20"
TESTED = ("0.16.1", "0.19.2")
OVERRIDE_ENV = "HPCTRAIN_COMPAT_ANY_MCORE"


def unsupported(found: str) -> str | None:
    """None when ``found`` is in SUPPORTED, else the message saying what to install."""
    from packaging.specifiers import SpecifierSet

    if found in SpecifierSet(SUPPORTED, prereleases=True):
        return None
    return (f"hpctrain supports megatron-core {SUPPORTED} (tested: {', '.join(TESTED)}), found {found}: "
            f"pip install 'megatron-core{SUPPORTED}'")
