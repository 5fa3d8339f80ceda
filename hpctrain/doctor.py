"""`hpctrain doctor`: what this machine has, what its absence disables, and whether training can run.

Exit code 0 when everything REQUIRED (torch, megatron-core, psutil, the native extension hpctrain._C) is
present; 1 otherwise. Optional pieces (CUDA, Transformer Engine, apex, Slurm, submitit) are reported with
what their absence disables.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

SLURM_COMMANDS = ("sbatch", "srun", "squeue", "scancel", "sinfo")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = False


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_torch() -> list[Check]:
    try:
        import torch
    except ImportError as e:
        return [Check("torch", False, f"cannot import: {e}", required=True)]
    checks = [Check("torch", True, torch.__version__, required=True)]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        detail = f"CUDA {torch.version.cuda}, {len(names)} GPU(s): {', '.join(names)}"
        checks.append(Check("CUDA", True, detail))
    else:
        built = torch.version.cuda or "none (CPU build)"
        checks.append(Check("CUDA", False, f"not available (torch built with CUDA: {built}); "
                                           "training runs on CPU with gloo (tests only)"))
    return checks


def check_megatron() -> list[Check]:
    from hpctrain.train.mcore_version import SUPPORTED, unsupported

    version = _version("megatron-core")
    if version is None or not _present("megatron.core"):
        return [Check("megatron-core", False, f"not installed: pip install 'megatron-core{SUPPORTED}'",
                      required=True)]
    problem = unsupported(version)
    return [Check("megatron-core", problem is None, problem or version, required=True)]


def check_optional_kernels() -> list[Check]:
    te = _present("transformer_engine")
    apex = _present("apex")
    te_detail = (_version("transformer-engine") or _version("transformer_engine") or "present") if te else (
        "absent: no TE layer spec (fused attention, rope fusion, tp_comm_overlap, context parallel in "
        "megatron-core's own spec), no FP8; hpctrain uses its portable spec instead")
    apex_detail = "present" if apex else (
        "absent: no fused Adam (torch's Adam is used), no gradient_accumulation_fusion, no fused LayerNorm/RMSNorm")
    return [Check("Transformer Engine", te, te_detail), Check("apex", apex, apex_detail)]


def check_native() -> list[Check]:
    try:
        from hpctrain import _C
    except ImportError as e:
        return [Check("hpctrain._C", False, f"native extension missing ({e}); reinstall: "
                                            "pip install --no-build-isolation -e .", required=True)]
    version = getattr(_C, "__version__", None) or getattr(_C, "version", lambda: "?")
    version = version() if callable(version) else version
    return [Check("hpctrain._C", True, f"version {version} ({_C.__file__})", required=True)]


def check_misc() -> list[Check]:
    checks = []
    psutil = _version("psutil")
    checks.append(Check("psutil", psutil is not None, psutil or
                        "not installed: megatron-core torch_dist saves hang without it (pip install psutil)",
                        required=True))
    submitit = _version("submitit")
    checks.append(Check("submitit", submitit is not None, submitit or "not installed: `hpctrain submit` disabled"))
    found = {c: shutil.which(c) for c in SLURM_COMMANDS}
    have = [c for c, p in found.items() if p]
    missing = [c for c, p in found.items() if not p]
    detail = f"found: {', '.join(have) or 'none'}" + (f"; missing: {', '.join(missing)}" if missing else "")
    if missing:
        detail += " (submit needs sbatch; training inside an allocation needs srun or torchrun)"
    checks.append(Check("Slurm", not missing, detail))
    return checks


def collect() -> list[Check]:
    py = Check("python", sys.version_info >= (3, 11), f"{platform.python_version()} ({sys.executable})"
               + ("" if sys.version_info >= (3, 11) else ": hpctrain needs Python >= 3.11 (tomllib)"), required=True)
    return [py, *check_torch(), *check_megatron(), *check_optional_kernels(), *check_native(), *check_misc()]


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        mark = "ok  " if c.ok else ("FAIL" if c.required else "--  ")
        lines.append(f"[{mark}] {c.name:<{width}}  {c.detail}")
    failed = [c.name for c in checks if c.required and not c.ok]
    lines.append("")
    lines.append(f"required missing: {', '.join(failed)}" if failed else "all required components present")
    return "\n".join(lines)


def check_job(cfg, config: str) -> list[Check]:
    """What the job in ``config`` needs of this machine: its model and dataset files, TE if it asks for it."""
    from hpctrain.data.sources import resolves_locally

    checks = []
    for key, value in (("model.model", cfg.model.model), ("model.load", cfg.model.load)):
        if value:
            ok = Path(value).exists()
            checks.append(Check(key, ok, value if ok else f"{value}: not found (from {config})", required=True))
    for spec in [*cfg.data.dataset, *cfg.data.val_dataset]:
        ok, detail = resolves_locally(spec)
        checks.append(Check(f"dataset {spec}", ok, detail, required=True))
    if cfg.model.transformer_impl == "transformer_engine":
        te = _present("transformer_engine")
        checks.append(Check("model.transformer_impl", te, "transformer_engine" if te else
                            "transformer_engine is asked for but not installed: pip install 'hpctrain[te]' "
                            "or set transformer_impl = \"local\"", required=True))
    return checks


def command_line():
    from hpctrain.cli_args import CommandLine

    return CommandLine("hpctrain doctor", __doc__.split("\n\n")[0] + " With config.toml: also what that job "
                       "needs (model and dataset files, Transformer Engine).", flags=[])


def run(argv: list[str]) -> int:
    args = command_line().parse(argv)
    checks = collect() + (check_job(args.cfg, args.config) if args.cfg is not None else [])
    print(render(checks))
    return 1 if any(c.required and not c.ok for c in checks) else 0
