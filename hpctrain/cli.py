"""The `hpctrain` command: one entry point, subcommands dispatched lazily, no logic of its own.

Each subcommand is a ``module:function`` taking ``argv`` (without the subcommand) and returning an exit
code. A subcommand whose module is not in this version says so and exits 2; a real ImportError inside an
existing module propagates (it is a bug or a missing dependency, not a missing feature).

A failure inside a command ends in one line (hpctrain.errors.describe): exit 2 for a mistake in the
input (a file, key, flag or checkpoint, named in the line), 1 for anything else (a full disk says so).
``--debug`` (anywhere on the command line) shows the traceback instead, in every rank it starts.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from hpctrain import errors

# name -> (target, one-line help). Order is the order `hpctrain --help` lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "sft": ("hpctrain.train.entry:run_sft", "supervised fine-tuning in this allocation (torchrun/srun/1 process)"),
    "pt": ("hpctrain.train.entry:run_pt", "pretraining / continued pretraining in this allocation"),
    "export": ("hpctrain.checkpoint.export:run", "convert HF <-> mcore checkpoints (--to_mcore / --to_hf)"),
    "reshard": ("hpctrain.checkpoint.reshard:run", "re-layout a checkpoint offline to another TP/PP (CPU only)"),
    "plan": ("hpctrain.plan.cli:run", "show the TP x PP x CP x DP layout, rank map and memory estimate"),
    "submit": ("hpctrain.launch.submit:run", "plan, render the sbatch job and submit it to Slurm"),
    "infer": ("hpctrain.infer:run", "generate text with a model to check it"),
    "prep": ("hpctrain.data.prep:run", "tokenize, template and pack datasets into memory-mapped shards"),
    "plot": ("hpctrain.train.plot:run", "draw a run's loss / validation loss / LR / grad norm / throughput PNG"),
    "templates": ("hpctrain.templates:run", "write the sbatch templates, an example cluster profile and the config "
                                            "reference into a folder"),
    "doctor": ("hpctrain.doctor:run", "check the environment: torch, CUDA, megatron-core, TE/apex, Slurm"),
}

EXIT_USAGE = errors.EXIT_USAGE


def usage() -> str:
    from hpctrain import __version__

    width = max(map(len, COMMANDS))
    lines = [f"usage: hpctrain <command> [ARG ...] [config.toml] [--key value ...]   (hpctrain {__version__})", "",
             "Fine-tune and pretrain Hugging Face LLMs with megatron-core on Slurm clusters.", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "options:", "  -h, --help     show this help and exit", "  -V, --version  print the version and exit",
              "  --debug        show the traceback of a failure (errors are one line otherwise)",
              "", "Config: defaults < config.toml < env (NPROC_PER_NODE, CUDA_VISIBLE_DEVICES) < --flags;",
              "flags use Megatron-SWIFT names (--lr 1e-5, --tensor_model_parallel_size 2) or dotted ones",
              "(--train.lr 1e-5); --key=value and dashes (--gpus-per-node) work too. Every key: docs/config.md",
              "(`hpctrain templates DIR` writes a copy). `hpctrain <command> --help` lists a command's flags."]
    return "\n".join(lines)


def resolve_target(target: str):
    """The callable behind ``module:function``, or None when this version does not have it."""
    module_name, _, func_name = target.partition(":")
    try:
        spec = importlib.util.find_spec(module_name)
    except ModuleNotFoundError:  # a parent package is missing
        spec = None
    if spec is None:
        return None
    module = importlib.import_module(module_name)  # real ImportErrors inside propagate
    return getattr(module, func_name, None)


def dispatch(command: str, argv: list[str]) -> int:
    from hpctrain.config import ConfigError

    func = resolve_target(COMMANDS[command][0])
    if func is None:
        print(f"hpctrain {command}: not available in this version", file=sys.stderr)
        return EXIT_USAGE
    try:
        code = func(argv)
    except KeyboardInterrupt:
        print(f"hpctrain {command}: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except BaseException as err:  # noqa: BLE001 - one line for every failure (torch's CheckpointException
        # is a BaseException); --debug shows the traceback
        if errors.debug_enabled():
            raise
        if isinstance(err, ConfigError):
            code, line = EXIT_USAGE, f"config error: {err}"
        else:
            code, line = errors.describe(err)
        report(command, code, line)
        return code
    return int(code or 0)


def report(command: str, code: int, line: str) -> None:
    """Print the failure line, or hand it to the launcher that started this rank (it prints one
    line for all ranks instead of one per rank plus its own report)."""
    rank = int(os.environ.get("RANK", "0") or 0)
    directory = os.environ.get(errors.REPORT_DIR_ENV)
    if directory:
        errors.write_report(directory, rank, code, line)
        return
    where = f" (rank {rank})" if rank else ""
    print(f"hpctrain {command}{where}: {line}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:  # anywhere: tracebacks instead of one-line errors, here and in child ranks
        argv.remove("--debug")
        os.environ[errors.DEBUG_ENV] = "1"
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else EXIT_USAGE
    if argv[0] in ("-V", "--version"):
        from hpctrain import __version__

        print(f"hpctrain {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        guess = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f" Did you mean '{guess[0]}'?" if guess else ""
        print(f"hpctrain: unknown command '{command}'.{hint} Commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_USAGE
    return dispatch(command, rest)


if __name__ == "__main__":
    sys.exit(main())
