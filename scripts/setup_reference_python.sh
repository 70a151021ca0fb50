#!/usr/bin/env bash
# A Python for `moescope run --reference-impl transformers` and its tests: a virtual environment
# with torch, transformers and safetensors from PyPI (about 5.6 GB: PyPI's torch brings its CUDA
# libraries; it runs on the CPU without a GPU). Reused when it already imports them.
#
#   scripts/setup_reference_python.sh [DEST]      (default target/reference-venv)
#
# Then: moescope run --reference-impl transformers --python DEST/bin/python3
set -euo pipefail
DEST=${1:-target/reference-venv}
if [ -x "$DEST/bin/python3" ] && "$DEST/bin/python3" -c "import torch, transformers, safetensors" 2>/dev/null; then
  echo "reference python ready: $DEST/bin/python3"; exit 0
fi
python3 -m venv "$DEST"
"$DEST/bin/pip" install -q --disable-pip-version-check torch transformers safetensors
"$DEST/bin/python3" -c "import torch, transformers; print('reference python ready:', '$DEST/bin/python3', 'torch', torch.__version__, 'transformers', transformers.__version__)"
