#!/usr/bin/env bash
# Install glm5-ascend into the current Python environment.
#   bash scripts/setup.sh         the package
#   bash scripts/setup.sh --dev   plus the test tools (pytest, openai, schemathesis; triton on x86_64)
#   bash scripts/setup.sh --npu   plus torch_npu, on an Ascend host with CANN installed
# Without a GPU or NPU a CPU build of torch is installed first: a bare `pip install torch`
# would pull a multi-GB CUDA build that a CPU host cannot use.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extra=""
case "${1:-}" in
  --dev) extra="[dev]" ;;
  --npu) extra="[npu]" ;;
  "") ;;
  *) echo "setup.sh: unknown option $1 (use --dev or --npu)" >&2; exit 2 ;;
esac
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 || command -v npu-smi >/dev/null 2>&1; then
    "$PY" -m pip install "torch>=2.6"
  else
    "$PY" -m pip install "torch==2.13.0" \
      || "$PY" -m pip install torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$PY" -m pip install -e ".${extra}"
# Tests: with Triton present, a host without a GPU still checks the cuda kernels (Triton's CPU
# interpreter) and compiles the Hopper kernel for sm_90. Optional: without it those tests skip.
if [ "$extra" = "[dev]" ] && [ "$(uname -m)" = "x86_64" ] && ! "$PY" -c "import triton" 2>/dev/null; then
  # Gluon's API moves between releases: the versions the Hopper kernel was checked with.
  "$PY" -m pip install "triton>=3.6,<3.10" \
    || echo "setup.sh: triton not installed; the cuda kernel checks will be skipped" >&2
fi
