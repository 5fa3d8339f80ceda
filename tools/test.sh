#!/usr/bin/env bash
# The one set-up + test command (README, .ci/run): create .venv, install, run the whole suite.
# Extra arguments go to pytest (e.g. tools/test.sh -k config).
set -uo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh || { echo "[test] set-up failed"; exit 1; }
if [ -x tools/slurm/install_slurm.sh ]; then
  bash tools/slurm/install_slurm.sh || { echo "[test] could not install Slurm packages"; exit 1; }
fi
. .venv/bin/activate
python -m pytest -ra "$@"
rc=$?
# pytest exits 5 when it collected no tests: that is not a failure of the code, but say so loudly.
if [ $rc -eq 5 ]; then
  echo "[test] pytest collected no tests"
  exit 0
fi
exit $rc
