"""Runs `hpctrain` command lines through the real CLI entry point (hpctrain.cli.main), one after
another in this one process (a process start costs ~10 s here), and records each one's exit status
and everything it printed. Usage: cli_driver.py PLAN.json  (PLAN: {"runs": {name: argv}, "out": FILE})
"""
import contextlib
import io
import json
import sys
from pathlib import Path


def main():
    plan = json.loads(Path(sys.argv[1]).read_text())
    from hpctrain.cli import main as cli

    results = {}
    for name, argv in plan["runs"].items():
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                rc = cli(argv)
            except SystemExit as e:
                rc = e.code
            except BaseException as e:  # an uncaught error is what the tests look for: keep going
                import traceback
                traceback.print_exc(file=out)
                rc = f"raised {type(e).__name__}"
        results[name] = {"rc": rc, "output": out.getvalue()}
    Path(plan["out"]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
