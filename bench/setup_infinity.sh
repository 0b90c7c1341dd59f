#!/usr/bin/env bash
# Create the peer's virtual environment for bench/serve.py: infinity-emb 0.0.78 on CPU torch.
#
# infinity-emb lives in its own venv because its pins (fastapi, transformers, optimum, ...)
# would fight Duet's. The torch/infinity pair below is the one bench/serve.py was run with;
# on a CPU machine, have a CPU build of torch 2.13.0 reachable by pip (a local wheel via
# PIP_FIND_LINKS, or PyTorch's CPU index via PIP_EXTRA_INDEX_URL) or pip pulls the CUDA build.
#
# Usage: bash bench/setup_infinity.sh [VENV_DIR]     (default /tmp/infvenv)
# Then:  python bench/serve.py --infinity VENV_DIR/bin/infinity_emb   (the default path is found by itself)
set -euo pipefail

VENV="${1:-/tmp/infvenv}"
PYTHON="${PYTHON:-python3}"

"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install torch==2.13.0 'infinity-emb[server,torch]==0.0.78'
"$VENV/bin/infinity_emb" v2 --help >/dev/null
echo "infinity-emb ready: $VENV/bin/infinity_emb"
