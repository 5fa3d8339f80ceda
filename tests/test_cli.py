"""The `hpctrain` entry point: help, version, lazy dispatch, "not available", errors without tracebacks."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hpctrain import cli

ROOT = Path(__file__).resolve().parents[1]


def run(args, extra_path=None, code=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(extra_path or ""), str(ROOT), env.get("PYTHONPATH", "")] if p)
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "hpctrain.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)


def test_help_lists_every_subcommand():
    r = run(["--help"])
    assert r.returncode == 0
    for name in ["sft", "pt", "export", "reshard", "plan", "submit", "infer", "prep", "doctor"]:
        assert f"\n  {name} " in r.stdout
    r = subprocess.run([sys.executable, "-m", "hpctrain", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.startswith("hpctrain 0.")


def test_no_command_and_unknown_command():
    assert run([]).returncode == 2
    r = run(["sfft"])
    assert r.returncode == 2 and "unknown command 'sfft'" in r.stderr and "Did you mean 'sft'?" in r.stderr


def test_commands_map_to_contract_targets():
    assert cli.COMMANDS["sft"][0] == "hpctrain.train.entry:run_sft"
    assert cli.COMMANDS["export"][0] == "hpctrain.checkpoint.export:run"
    assert cli.COMMANDS["doctor"][0] == "hpctrain.doctor:run"


def _patched(target: str, *argv: str) -> str:
    return textwrap.dedent(f"""
        import sys
        from hpctrain import cli
        cli.COMMANDS["x"] = ({target!r}, "test")
        sys.exit(cli.main(["x", *{list(argv)!r}]))
    """)


def test_missing_module_or_function_is_not_available():
    for target in ["hpctrain.no_such_module:run", "no_such_pkg.mod:run", "hpctrain.cli:no_such_function"]:
        r = run([], code=_patched(target))
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip() == "hpctrain x: not available in this version"


@pytest.fixture
def plugin(tmp_path):
    pkg = tmp_path / "hpct_test_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "broken.py").write_text("import no_such_dependency_xyz\ndef run(argv):\n    return 0\n")
    (pkg / "cfg.py").write_text(textwrap.dedent("""
        from hpctrain.config import config_from_argv
        def run(argv):
            config_from_argv(argv, environ={})
            return 0
        def echo(argv):
            print("argv=" + repr(argv))
            return 3
    """))
    return tmp_path


def test_real_import_error_propagates(plugin):
    r = run([], extra_path=plugin, code=_patched("hpct_test_plugin.broken:run"))
    assert r.returncode == 1 and "ModuleNotFoundError: No module named 'no_such_dependency_xyz'" in r.stderr


def test_config_error_exit_2_without_traceback(plugin):
    r = run([], extra_path=plugin, code=_patched("hpct_test_plugin.cfg:run", "--lr_warmup_iter", "3"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "config error" in r.stderr and "Did you mean 'lr_warmup_iters'" in r.stderr


def test_dispatch_passes_argv_and_exit_code(plugin):
    r = run([], extra_path=plugin, code=_patched("hpct_test_plugin.cfg:echo", "a.toml", "--lr", "1"))
    assert r.returncode == 3 and "argv=['a.toml', '--lr', '1']" in r.stdout


def test_doctor_runs_and_passes_here():
    r = run(["doctor"])
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ["python", "torch", "CUDA", "megatron-core", "Transformer Engine", "apex", "hpctrain._C",
                 "psutil", "submitit", "Slurm"]:
        assert name in r.stdout
    assert "all required components present" in r.stdout


def test_doctor_fails_when_required_missing(tmp_path):
    # A shadowing `megatron` package without `core` makes megatron-core really unimportable for the child.
    (tmp_path / "megatron").mkdir()
    (tmp_path / "megatron" / "__init__.py").write_text("")
    r = run(["doctor"], extra_path=tmp_path)
    assert r.returncode == 1, r.stdout
    assert "[FAIL] megatron-core" in r.stdout and "required missing: megatron-core" in r.stdout
