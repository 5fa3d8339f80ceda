"""`hpctrain templates DIR [config.toml] [--overwrite]`: write the sbatch templates, an example
cluster profile and the config reference into DIR, for editing and keeping in version control.

    DIR/train.sbatch prep.sbatch export.sbatch reshard.sbatch    plain-sbatch jobs (see docs/slurm.md)
    DIR/profiles/example-h100.toml                               copy, rename, edit: `submit --profile`
    DIR/config.md                                                every config key, type, default, meaning
    DIR/config.toml                                              with a config: the resolved job config,
                                                                 which train.sbatch runs by default

The files come from the installed package (a wheel carries them), so this works without a checkout.
Existing files are never replaced unless --overwrite is given.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from hpctrain.bundled import bundled, config_reference


def template_files() -> dict[str, Path]:
    """{name in DIR: installed source file}."""
    slurm = bundled("slurm")
    files = {p.name: p for p in sorted(slurm.glob("*.sbatch"))}
    files.update({f"profiles/{p.name}": p for p in sorted((slurm / "profiles").glob("example-*.toml"))})
    files["config.md"] = config_reference()
    return files


def write_templates(out: Path, overwrite: bool = False, job=None) -> list[Path]:
    """Copy the templates (and ``job``, a JobConfig, as config.toml) into ``out``; the written paths."""
    from hpctrain.config import ConfigError, dump_toml

    files = template_files()
    names = list(files) + (["config.toml"] if job is not None else [])
    clash = [n for n in names if (out / n).exists()]
    if clash and not overwrite:
        raise ConfigError(f"{out} already holds {', '.join(clash)}: choose another folder or pass --overwrite true")
    written = []
    for name, src in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out / name)
        written.append(out / name)
    if job is not None:
        dump_toml(job, out / "config.toml")
        written.append(out / "config.toml")
    return written


def command_line():
    from hpctrain.cli_args import CommandLine, Positional, flag

    return CommandLine("hpctrain templates", __doc__.split("\n\n")[0], flags=[
        flag("--overwrite", "--exist_ok", kind="bool", default=False, help="replace files that exist")],
        positionals=[Positional("dir", "folder to write into (created when missing)")])


def run(argv: list[str]) -> int:
    args = command_line().parse(argv)
    out = Path(args.dir)
    try:
        written = write_templates(out, args.overwrite, args.cfg)
    except OSError as e:
        print(f"hpctrain templates: cannot write into {out}: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    print(f"next: edit {out}/profiles/example-h100.toml (partition, account, modules) and the #SBATCH lines of "
          f"{out}/train.sbatch; `hpctrain submit --profile PROFILE --nodes N job.toml` or `sbatch train.sbatch`")
    return 0
