"""``python -m hpctrain.train.quiet_torchrun ARGS``: torchrun without its own failure report.

When a rank fails, torchrun logs the failure and exits through a ChildFailedError traceback with a
summary block per rank (~40 lines) - after the rank has already reported the cause. ``hpctrain
sft/pt`` with NPROC_PER_NODE > 1 starts torchrun through this module and prints one line per
failure itself (the ranks hand their lines over in $HPCTRAIN_ERROR_DIR); the exit status is the
first failed rank's. With --debug the plain torchrun runs instead.
"""
from __future__ import annotations

import logging
import sys


def main() -> int:
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    for name, lg in list(logging.root.manager.loggerDict.items()):
        if name.startswith("torch.distributed.elastic") and isinstance(lg, logging.Logger):
            lg.setLevel(logging.CRITICAL)
    try:
        run.main()
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        code = failure.exitcode
        return code if code > 0 else 128 - code  # killed by signal N: 128 + N, as a shell says
    return 0


if __name__ == "__main__":
    sys.exit(main())
