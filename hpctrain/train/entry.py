"""`hpctrain sft` / `hpctrain pt`: config -> launch -> data -> training loop.

Launch modes:
* under torchrun or srun (RANK / SLURM_PROCID in the environment): this process is one rank;
* started by hand with NPROC_PER_NODE=N > 1 (or --nproc_per_node N): re-launches itself under
  ``torchrun --nproc_per_node N`` (as the seed's `megatron sft` does) and returns its exit status;
* otherwise a single process (CPU/gloo when there is no GPU: tests, demos, login-node smoke runs).

Exit codes: 0 done; signals.REQUEUE_EXIT_CODE (42) stopped on SIGTERM/SIGUSR1 after saving
("requeue me"); 3 non-finite loss/grad norm; 1 other errors. torchrun does not pass the workers'
exit codes through, so rank 0 also writes its code to $HPCTRAIN_STATUS_FILE when set and the
self-launching parent returns it.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("hpctrain.train")

EXIT_NONFINITE = 3
EXIT_CONFIG = 2  # cli.py's usage / config error code


def run_sft(argv: list[str]) -> int:
    return _run(argv, "sft")


def run_pt(argv: list[str]) -> int:
    return _run(argv, "pt")


def _under_launcher() -> bool:
    return "RANK" in os.environ or ("SLURM_PROCID" in os.environ and int(
        os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS") or 1) > 1)


def command_line(mode: str = "sft"):
    from hpctrain.cli_args import CommandLine

    doc = {"sft": "supervised fine-tuning", "pt": "pretraining / continued pretraining"}[mode]
    return CommandLine(f"hpctrain {mode}", f"{doc} in this allocation (torchrun, srun or one process)",
                       flags=[], mode=mode, all_keys=True, on_this_machine=True)


def _run(argv: list[str], mode: str) -> int:
    cfg = command_line(mode).parse(argv).cfg
    nproc = cfg.launch.nproc_per_node or int(os.environ.get("NPROC_PER_NODE", "1") or 1)
    if nproc > 1 and not _under_launcher():
        return spawn_torchrun(cfg, argv, mode, nproc)
    return train_from_config(cfg)


def spawn_torchrun(cfg, argv: list[str], mode: str, nproc: int) -> int:
    """Re-run this command under torchrun; no shell: user strings are passed as argv items.

    The ranks hand a failure line over in $HPCTRAIN_ERROR_DIR instead of printing it, and torchrun
    runs without its own report (quiet_torchrun): one line for the failure, not one per rank plus
    torchrun's traceback. --debug keeps everything (plain torchrun, every rank's traceback)."""
    from hpctrain import errors
    from hpctrain.train.dist import _free_port

    la = cfg.launch
    # One node and no port given: a free local port (a fixed default collides with other jobs).
    port = la.master_port or (_free_port() if (la.nnodes or 1) == 1 else 29500)
    runner = "torch.distributed.run" if errors.debug_enabled() else "hpctrain.train.quiet_torchrun"
    cmd = [sys.executable, "-m", runner, f"--nproc_per_node={nproc}",
           f"--nnodes={la.nnodes or 1}", f"--node_rank={la.node_rank or 0}",
           f"--master_addr={la.master_addr or '127.0.0.1'}", f"--master_port={port}",
           "-m", "hpctrain.cli", mode, *argv]
    env = dict(os.environ)
    env.pop("NPROC_PER_NODE", None)
    if la.cuda_visible_devices:
        env["CUDA_VISIBLE_DEVICES"] = la.cuda_visible_devices
    with tempfile.TemporaryDirectory(prefix="hpctrain-") as tmp:
        status = Path(tmp) / "status"
        env["HPCTRAIN_STATUS_FILE"] = str(status)
        if not errors.debug_enabled():
            env[errors.REPORT_DIR_ENV] = tmp
        rc = _run_torchrun(cmd, env)
        failure = errors.read_report(tmp)
        if failure is not None:
            where = f" (rank {failure['rank']})" if failure["rank"] else ""
            print(f"hpctrain {mode}{where}: {failure['line']}", file=sys.stderr)
            return int(failure["code"])
        if status.is_file():
            return int(status.read_text().strip() or rc)
        if rc:
            print(f"hpctrain {mode}: a training process ended with exit status {rc} without a report "
                  "(killed, out of memory?); rerun with --debug for torchrun's report", file=sys.stderr)
        return rc


def _run_torchrun(cmd: list[str], env: dict) -> int:
    proc = subprocess.Popen(cmd, env=env)
    # torchrun forwards SIGTERM to its workers but not SIGUSR1: turn either into SIGTERM for it.
    # (Its grace period before SIGKILL is ~30 s; a save cut short leaves the previous checkpoint.)
    previous = {s: signal.signal(s, lambda *_: proc.send_signal(signal.SIGTERM))
                for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _setup_logging(cfg, rank: int) -> None:
    level = cfg.log.logging_level or ("INFO" if rank == 0 else "WARNING")
    logging.basicConfig(level=getattr(logging, level), format="[%(asctime)s] %(message)s",
                        datefmt="%H:%M:%S", force=True)


def train_from_config(cfg) -> int:
    """Train as cfg says (cfg.train.mode: sft or pt, set by the subcommand); returns the exit code."""
    from hpctrain.config import ConfigError
    from hpctrain.train import dist, loop, model_source
    from hpctrain.train.step import NonFiniteError

    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    _setup_logging(cfg, rank)
    code = 1
    try:
        check_inputs(cfg)
        model = model_source.fill_model_fields(cfg)  # before the data: the tokenizer is checked against it
        source, valid = build_data(cfg, cfg.train.mode, model)
        result = loop.run(cfg, source, valid, model)
        code = result.exit_code
        if rank == 0 and result.save_dir:
            log.info("training finished at iteration %d; checkpoints in %s", result.iteration, result.save_dir)
    except NonFiniteError as e:
        if rank == 0:  # every rank stops on the same (all-reduced) value: one line
            log.error("%s", e)
        code = EXIT_NONFINITE
    except ConfigError:  # found once the data / checkpoint are known (e.g. a changed LR schedule on resume)
        code = EXIT_CONFIG  # the CLI prints the one line; torchrun's parent returns this code
        raise
    finally:
        _write_status(rank, code)
        dist.destroy()
    return code


def check_inputs(cfg) -> None:
    """Before anything slow starts: a --load / --model that does not exist, or a damaged JSON file
    (config, tokenizer) next to them, is one line naming the path."""
    from hpctrain.errors import UserError
    from hpctrain.files import check_json_files
    from hpctrain.train.model_source import find_hf_config

    load_needed = cfg.checkpoint.exit_on_missing_checkpoint
    for flag, value, needed in (("--load", cfg.model.load, load_needed), ("--model", cfg.model.model, True)):
        if value and needed and not Path(value).exists():
            raise UserError(f"{flag} {value}: no such file or directory")
    if cfg.tuner.adapters:  # a PEFT folder: read by every rank after the model is built; check it now
        from hpctrain.model.lora.peft_map import read_adapter

        read_adapter(cfg.tuner.adapters[0])
    hf = find_hf_config(cfg)
    if hf is not None:
        check_json_files(hf.parent)


def _write_status(rank: int, code: int) -> None:
    path = os.environ.get("HPCTRAIN_STATUS_FILE")
    if path and rank == 0:
        Path(path).write_text(str(code))


def tokenizer_source(cfg) -> str:
    """--model (HF dir or .gguf), else the --load checkpoint's run root (conversion and training
    copy the tokenizer there; a save root resolves to its newest complete run)."""
    from hpctrain.config.errors import ConfigError
    from hpctrain.train.model_source import find_hf_config

    if cfg.model.model:
        return str(cfg.model.model)
    hf = find_hf_config(cfg)
    if hf is None:
        raise ConfigError(f"no tokenizer: --load {cfg.model.load} holds no config.json + tokenizer files "
                          "(a checkpoint converted by `hpctrain export` or saved by `hpctrain sft` does); "
                          "pass --model HF_DIR for them")
    return str(hf.parent)


class LoaderSource:
    """Adapts hpctrain.data's MicroBatchLoader to the loop's batch-source protocol."""

    def __init__(self, dataset, cfg, packed: bool, pad_multiple: int):
        self.dataset, self.cfg, self.packed, self.pad = dataset, cfg, packed, pad_multiple
        self.num_samples = len(dataset)
        self._it, self._next = None, None

    def _loader(self, consumed: int, mbs: int, shuffle: bool):
        from megatron.core import parallel_state as ps

        from hpctrain.data import MicroBatchLoader
        return iter(MicroBatchLoader(self.dataset, mbs, ps.get_data_parallel_rank(),
                                     ps.get_data_parallel_world_size(), self.cfg.data.data_seed,
                                     consumed_samples=consumed, pad_to_multiple=self.pad, shuffle=shuffle,
                                     num_workers=self.cfg.data.num_workers))

    def _shuffle(self) -> bool:
        """dataloader_type cyclic (Megatron's random sampler): a new order every epoch, unless
        train_dataloader_shuffle = false; single: the dataset's order."""
        return self.cfg.train.dataloader_type == "cyclic" and self.cfg.data.train_dataloader_shuffle

    def __call__(self, consumed: int, n_micro: int, mbs: int):
        from megatron.core import parallel_state as ps
        if self._it is None or self._next != consumed:
            self._it = self._loader(consumed, mbs, self._shuffle())
        out = [next(self._it) for _ in range(n_micro)]
        self._next = consumed + n_micro * mbs * ps.get_data_parallel_world_size()
        return out

    def valid(self, n_micro: int | None, mbs: int):
        it = self._loader(0, mbs, False)  # the validation rows' order is data.val_dataset_shuffle's
        n = n_micro or max(1, self.num_samples // (mbs * _dp()))
        out = []
        for _ in range(n):
            try:
                out.append(next(it))
            except StopIteration:
                break
        return out


def _dp() -> int:
    from megatron.core import parallel_state as ps
    return ps.get_data_parallel_world_size()


def build_data(cfg, mode: str, model=None):
    """(train source, valid source or None) from hpctrain.data; ``model`` (a ModelSource): refuse a
    tokenizer with more tokens than the model has embedding rows."""
    try:
        from hpctrain.data import MicroBatchLoader, build_train_valid  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"hpctrain.data's loader is not available ({e}); cannot read datasets") from e
    from hpctrain.train.loop import _pad_multiple

    from hpctrain.data import load_tokenizer

    src = tokenizer_source(cfg)
    tok = load_tokenizer(src)
    if model is not None:
        from hpctrain.train.model_source import check_tokenizer
        check_tokenizer(tok, src, model, cfg)
    train_ds, valid_ds = build_train_valid(cfg, tok, mode=mode, tokenizer_source=src)
    pad = _pad_multiple(cfg)
    train = LoaderSource(train_ds, cfg, bool(cfg.data.packing), pad)
    valid = LoaderSource(valid_ds, cfg, bool(cfg.data.packing), pad).valid if valid_ds is not None and \
        len(valid_ds) else None
    return train, valid
