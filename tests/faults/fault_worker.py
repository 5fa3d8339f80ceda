"""``python fault_worker.py FLAGS...``: ``hpctrain sft FLAGS...`` through the real CLI (dispatch, error
lines, exit codes, lock, loop, checkpoints, megatron-core's writer) on the trainer tests' tiny model
and synthetic data (tests/train/trainer_worker.py), so a fault test costs seconds, not a tokenizer and
a 150k-entry vocabulary.

Fault hooks (environment):
  FAULT_SLOW_WRITER=S   megatron-core's forked checkpoint writer sleeps S seconds before writing
                        (a window in which the writer process is alive)
  FAULT_NAN_AT=K        the training loss of iteration K (counted in this process) is NaN
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

from trainer_worker import TINY, Source  # noqa: E402


def _slow_writer(seconds: float) -> None:
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    original = FileSystemWriterAsync.write_preloaded_data

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    FileSystemWriterAsync.write_preloaded_data = staticmethod(slow)


def _nan_at(k: int) -> None:
    from hpctrain.train import step

    original, calls = step.reduce_losses, []

    def reduce_losses(losses):
        loss, tokens = original(losses)
        calls.append(1)
        return (float("nan") if len(calls) == k else loss), tokens

    step.reduce_losses = reduce_losses


def main() -> int:
    from hpctrain import cli
    from hpctrain.train import entry

    entry.build_data = lambda cfg, mode, model=None: (Source(False), None)
    if os.environ.get("FAULT_SLOW_WRITER"):
        _slow_writer(float(os.environ["FAULT_SLOW_WRITER"]))
    if os.environ.get("FAULT_NAN_AT"):
        _nan_at(int(os.environ["FAULT_NAN_AT"]))
    return cli.main(["sft", *TINY, *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
