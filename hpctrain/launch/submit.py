"""`hpctrain submit`: plan the layout, render the sbatch job, submit it with submitit.

    hpctrain submit --nodes N [--gpus-per-node G] [--dry-run] [--cpu] config.toml [--key value ...]
    hpctrain submit export|reshard|prep [--profile cluster.toml] [--gpus K] [--dry-run] ARGS...

Training: the resolved config is written into a FRESH job folder (<[slurm] folder>/<job>-<time>-<id>/;
Slurm job ids restart on a fresh cluster, so a reused folder could return an old job's result) and
every task runs ``python -m hpctrain.cli sft|pt <folder>/config.toml`` (or --program MODULE).
export/reshard/prep run one process on one node (export on one GPU, reshard/prep on CPU).
"""
from __future__ import annotations

import datetime
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from hpctrain.launch.render import executor_params, render_script
from hpctrain.launch.task import TrainTask

ONE_NODE_COMMANDS = {"export": 1, "reshard": 0, "prep": 0}


def fresh_folder(base: str, job_name: str, create: bool = True) -> Path:
    """A new, never-used job folder under ``base``."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in job_name)[:40] or "job"
    path = Path(base).resolve() / f"{safe}-{stamp}-{secrets.token_hex(3)}"
    if create:
        path.mkdir(parents=True, exist_ok=False)
    return path


def program_argv(program: str | None, mode: str, config: Path) -> list[str]:
    """What each rank runs: hpctrain.cli sft|pt, or a custom module / .py file, given the job's config."""
    if program is None:
        return [sys.executable, "-m", "hpctrain.cli", mode, str(config)]
    if program.endswith(".py"):
        return [sys.executable, str(Path(program).resolve()), str(config)]
    return [sys.executable, "-m", program, str(config)]


def command_line():
    from hpctrain.cli_args import CommandLine, flag
    from hpctrain.plan.cli import PLANNER_FLAGS

    return CommandLine("hpctrain submit", __doc__, mode="sft", all_keys=True, flags=[
        *PLANNER_FLAGS,
        flag("--dry_run", kind="bool", default=False, help="print the plan and the rendered sbatch script; "
                                                            "submit nothing"),
        flag("--mode", choices=("sft", "pt"), default="sft", help="training subcommand run by each task"),
        flag("--program", help="run this Python module (or .py file) per rank instead of hpctrain.cli sft/pt "
                               "(custom workloads); it receives the job folder's config.toml as its argument"),
        flag("--cpu", kind="bool", default=False, help="request no GPUs: gpus_per_node processes per node on CPUs"),
        flag("--wait", kind="bool", default=False, help="block until the job ends and print its result"),
        flag("--profile", help="cluster profile: a TOML file with a [slurm] section (the job's [slurm] values "
                               "and flags win over it)"),
    ])


def _submit(params: dict[str, Any], folder: Path, task: TrainTask, max_requeue: int):
    import submitit

    from hpctrain.launch.render import sbatch_text

    class Executor(submitit.SlurmExecutor):
        # Render through sbatch_text so the submitted script is exactly what --dry-run prints.
        def _make_submission_file_text(self, command: str, uid: str) -> str:
            return sbatch_text(command, str(self.folder), self.parameters)

    executor = Executor(folder=folder, max_num_timeout=max_requeue)
    executor.update_parameters(**params)
    return executor.submit(task)


def _print_job(job, folder: Path) -> None:
    print(f"submitted job {job.job_id}")
    print(f"  folder: {folder}")
    print(f"  stdout: {job.paths.stdout}")
    print(f"  stderr: {job.paths.stderr}")


def _finish(job, wait: bool) -> int:
    if not wait:
        return 0
    try:
        job.results()
    except Exception as e:  # noqa: BLE001 - report any job failure with its log path
        print(f"job {job.job_id} failed: {e}\n  see {job.paths.stderr}", file=sys.stderr)
        return 1
    print(f"job {job.job_id} finished")
    return 0


def _sbatch_refused(e: Exception) -> int:
    print(f"hpctrain submit: Slurm refused the job: {str(e).strip()}\n"
          f"  (check --nodes / [slurm] gpus_per_node, partition, time against `sinfo`)", file=sys.stderr)
    return 1


def submit_training(argv: list[str]) -> int:
    from hpctrain.config import ConfigError, dump_toml
    from hpctrain.launch.profile import apply_profile
    from hpctrain.plan.cli import cluster_from
    from hpctrain.plan.layout import LayoutError
    from hpctrain.plan.planner import make_plan
    from hpctrain.plan.report import format_plan

    try:
        args = command_line().parse(argv)
        cfg = args.cfg
        if args.profile:
            apply_profile(cfg, args.profile, args.config, args.overrides)
        cluster = cluster_from(args, cfg)
        cfg.slurm.nodes, cfg.slurm.gpus_per_node = cluster.nodes, cluster.gpus_per_node
        plan = make_plan(cfg, cluster, args.gpu_memory_gib, auto=args.auto)
        if args.auto:
            cfg.parallel.tensor_model_parallel_size = plan.layout.tp
            cfg.parallel.pipeline_model_parallel_size = plan.layout.pp
        params = executor_params(cfg.slurm, cluster.nodes, cluster.gpus_per_node, cfg.slurm.launcher,
                                 use_gpus=not args.cpu, environ=os.environ)
    except (ConfigError, LayoutError, ValueError) as e:
        print(f"hpctrain submit: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    folder = fresh_folder(cfg.slurm.folder, cfg.slurm.job_name, create=not args.dry_run)
    if args.dry_run:
        print(f"\n# dry run: nothing submitted; the job folder would be {folder}\n")
        print(render_script(params, str(folder), sys.executable))
        return 0
    dump_toml(cfg, folder / "config.toml")
    program = program_argv(args.program, args.mode, folder / "config.toml")
    task = TrainTask(program=program, launcher=cfg.slurm.launcher, gpus_per_node=cluster.gpus_per_node,
                     save_dir=cfg.checkpoint.save, max_requeue=cfg.slurm.max_requeue)
    try:
        job = _submit(params, folder, task, cfg.slurm.max_requeue)
    except Exception as e:  # noqa: BLE001 - submitit raises FailedJobError / CalledProcessError
        return _sbatch_refused(e)
    _print_job(job, folder)
    return _finish(job, args.wait)


def one_node_command_line(command: str):
    from hpctrain.cli_args import CommandLine, flag

    return CommandLine(f"hpctrain submit {command}", f"run `hpctrain {command} ARGS...` as a one-node job; "
                       f"every flag not listed here goes to `hpctrain {command}`", passthrough=True, flags=[
        flag("--profile", help="TOML file whose [slurm] section describes the cluster"),
        flag("--gpus", type=int, default=ONE_NODE_COMMANDS[command], help="GPUs for the job (0 = CPU only)"),
        flag("--dry_run", kind="bool", default=False, help="print the sbatch script; submit nothing"),
        flag("--wait", kind="bool", default=False, help="block until the job ends"),
    ])


def submit_one_node(command: str, argv: list[str]) -> int:
    from hpctrain.config import ConfigError, JobConfig, load_config
    from hpctrain.launch.profile import apply_profile

    try:
        args = one_node_command_line(command).parse(argv)
        rest = args.rest
        own = next((t for t in rest if t.endswith(".toml")), None)  # the command's config carries [slurm]
        cfg = load_config(own, mode="prep") if own else JobConfig()
        if args.profile:
            apply_profile(cfg, args.profile, own, [])
        slurm = cfg.slurm
        slurm.job_name = f"{slurm.job_name}-{command}"
        params = executor_params(slurm, 1, 1, "srun", use_gpus=args.gpus > 0, environ=os.environ)
        if args.gpus > 1:
            params["gpus_per_node"] = args.gpus
    except (ConfigError, ValueError) as e:
        print(f"hpctrain submit {command}: {e}", file=sys.stderr)
        return 2
    folder = fresh_folder(slurm.folder, slurm.job_name, create=not args.dry_run)
    if args.dry_run:
        print(render_script(params, str(folder), sys.executable))
        return 0
    task = TrainTask(program=[sys.executable, "-m", "hpctrain.cli", command, *rest], max_requeue=0)
    try:
        job = _submit(params, folder, task, 0)
    except Exception as e:  # noqa: BLE001
        return _sbatch_refused(e)
    _print_job(job, folder)
    return _finish(job, args.wait)


def run(argv: list[str]) -> int:
    if argv and argv[0] in ONE_NODE_COMMANDS:
        return submit_one_node(argv[0], argv[1:])
    return submit_training(argv)
