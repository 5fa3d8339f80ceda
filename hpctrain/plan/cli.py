"""`hpctrain plan --nodes N [--gpus-per-node G] [--gpu-memory-gib M] [--auto] [--json] config.toml [--key value ...]`"""
from __future__ import annotations

import argparse
import json
import sys

from hpctrain.plan.layout import Cluster, LayoutError
from hpctrain.plan.planner import make_plan
from hpctrain.plan.report import format_plan, plan_dict


def planner_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=None, help="nodes (default: [slurm] nodes)")
    parser.add_argument("--gpus-per-node", "--gpus_per_node", dest="gpus_per_node", type=int, default=None,
                        help="GPUs per node (default: [slurm] gpus_per_node)")
    parser.add_argument("--gpu-memory-gib", "--gpu_memory_gib", dest="gpu_memory_gib", type=float, default=80.0,
                        help="memory of one GPU in GiB for the fit check (default 80)")
    parser.add_argument("--auto", action="store_true", help="pick the smallest TP (then PP) that fits")


def cluster_from(args: argparse.Namespace, cfg) -> Cluster:
    return Cluster(args.nodes or cfg.slurm.nodes, args.gpus_per_node or cfg.slurm.gpus_per_node)


def run(argv: list[str]) -> int:
    from hpctrain.config import ConfigError, config_from_argv

    parser = argparse.ArgumentParser(prog="hpctrain plan", description=__doc__)
    planner_args(parser)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = config_from_argv(rest, mode="plan")
        plan = make_plan(cfg, cluster_from(args, cfg), args.gpu_memory_gib, auto=args.auto)
    except (ConfigError, LayoutError, ValueError) as e:
        print(f"hpctrain plan: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan_dict(plan), indent=1) if args.json else format_plan(plan))
    return 0
