"""`hpctrain plan [config.toml] --nodes N [--gpus_per_node G] [--gpu_memory_gib M] [--auto] [--json] [--key value ...]`"""
from __future__ import annotations

import json
import sys

from hpctrain.cli_args import CommandLine, flag
from hpctrain.plan.layout import Cluster, LayoutError
from hpctrain.plan.planner import make_plan
from hpctrain.plan.report import format_plan, plan_dict

PLANNER_FLAGS = [
    flag("--nodes", type=int, config="slurm.nodes", help="nodes"),
    flag("--gpus_per_node", type=int, config="slurm.gpus_per_node", help="GPUs per node"),
    flag("--gpu_memory_gib", type=float, default=80.0, help="memory of one GPU in GiB for the fit check"),
    flag("--auto", kind="bool", default=False, help="pick the smallest TP (then PP) that fits"),
]


def cluster_from(args, cfg) -> Cluster:
    """--nodes / --gpus_per_node when given as flags, else the config's [slurm] (after any profile)."""
    return Cluster(args.nodes if "nodes" in args.given else cfg.slurm.nodes,
                   args.gpus_per_node if "gpus_per_node" in args.given else cfg.slurm.gpus_per_node)


def command_line() -> CommandLine:
    return CommandLine("hpctrain plan", __doc__, mode="plan", all_keys=True, flags=[
        *PLANNER_FLAGS, flag("--json", kind="bool", default=False, help="print the plan as JSON")])


def run(argv: list[str]) -> int:
    from hpctrain.config import ConfigError

    try:
        args = command_line().parse(argv)
        plan = make_plan(args.cfg, cluster_from(args, args.cfg), args.gpu_memory_gib, auto=args.auto)
    except (ConfigError, LayoutError, ValueError) as e:
        print(f"hpctrain plan: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan_dict(plan), indent=1) if args.json else format_plan(plan))
    return 0
