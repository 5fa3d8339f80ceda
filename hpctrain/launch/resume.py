"""Resume flags for plain-sbatch templates: ``python -m hpctrain.launch.resume CONFIG [--key value ...]``.

Prints, one per line, the flags that continue the newest checkpoint under the config's
``[checkpoint] save`` (``--load D --save D --finetune false --add_version false``), but only when the
job is a requeued one (SLURM_RESTART_COUNT > 0) or ``--always`` is given; otherwise prints nothing,
so a fresh submission starts a fresh run. Used by slurm/train.sbatch:

    mapfile -t RESUME < <(python -m hpctrain.launch.resume "$CONFIG")
    srun python -m hpctrain.cli sft "$CONFIG" "${RESUME[@]}"
"""
from __future__ import annotations

import os
import sys

from hpctrain.launch.task import latest_checkpoint, resume_overrides


def resume_flags(save_dir: str | None, restart_count: int, always: bool = False) -> list[str]:
    if restart_count <= 0 and not always:
        return []
    ckpt = latest_checkpoint(save_dir)
    return resume_overrides(ckpt) if ckpt else []


def main(argv: list[str]) -> int:
    from hpctrain.config import ConfigError, config_from_argv

    always = "--always" in argv
    argv = [a for a in argv if a != "--always"]
    try:
        cfg = config_from_argv(argv, mode="sft")
    except ConfigError as e:
        print(f"hpctrain.launch.resume: {e}", file=sys.stderr)
        return 2
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    for flag in resume_flags(cfg.checkpoint.save, restarts, always):
        if "\n" in flag:
            print(f"hpctrain.launch.resume: checkpoint path {flag!r} contains a newline", file=sys.stderr)
            return 2
        print(flag)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
