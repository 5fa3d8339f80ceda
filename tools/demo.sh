#!/usr/bin/env bash
# README command 1: set up .venv (tools/setup_env.sh), then run the quickstart end to end on the real
# SmolLM2-135M-Instruct and the bundled data: ask it "who are you?", convert HF -> mcore, fine-tune it
# with a new name (CPU/gloo without a GPU, the GPUs when there are), convert back, ask again.
# Extra arguments go to the quickstart (python -m hpctrain.quickstart --help), e.g.
#   bash tools/demo.sh --train_iters 20 --workdir /tmp/qs
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
exec .venv/bin/python -m hpctrain.quickstart "$@"
