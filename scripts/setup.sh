#!/usr/bin/env bash
# Install glm5-ascend into the current Python environment (a venv: see the README).
#   bash scripts/setup.sh         the package
#   bash scripts/setup.sh --dev   plus the test tools (pytest, openai, schemathesis; triton on x86_64)
#   bash scripts/setup.sh --npu   plus torch_npu, on an Ascend host with CANN installed
#   --print     only print the commands it would run
#   --dry-run   print them and let pip resolve the torch step (pip install --dry-run --report), installing
#               nothing; the report goes to $GLM5_SETUP_REPORT (default: a temp file, its path printed)
# torch is pinned to $GLM5_TORCH_VERSION (default 2.13.0). Without a GPU, and on Ascend hosts (torch_npu
# runs on the CPU build), torch comes from PyTorch's CPU index: a bare `pip install torch` on Linux
# x86_64 resolves to the CUDA build, several GB of nvidia-* wheels a CPU host cannot use. If that index
# cannot be reached, it falls back to the default index. torch_npu is pinned to the torch release it is
# installed with: torch_npu 2.13.0 needs CANN 9.2.0 (TorchNPU 26.2.0's compatibility table).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${GLM5_TORCH_VERSION:-2.13.0}
CPU_INDEX=${GLM5_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
extra="" mode=install
for arg in "$@"; do
  case "$arg" in
    --dev) extra="[dev]" ;;
    --npu) extra="[npu]" ;;
    --print) mode=print ;;
    --dry-run) mode=dry-run ;;
    *) echo "setup.sh: unknown option $arg (use --dev, --npu, --print or --dry-run)" >&2; exit 2 ;;
  esac
done

run() {  # print a command, then run it (install mode only)
  echo "+ $*"
  if [ "$mode" = install ]; then "$@"; fi
}

# Which torch build this host needs: cuda (an NVIDIA GPU) or cpu (no GPU, or an Ascend NPU).
device=${GLM5_SETUP_DEVICE:-}
if [ -z "$device" ]; then
  if [ "$extra" != "[npu]" ] && ! command -v npu-smi >/dev/null 2>&1 && command -v nvidia-smi >/dev/null 2>&1; then
    device=cuda
  else
    device=cpu
  fi
fi
case "$device" in
  cpu) torch_args=("torch==$TORCH_VERSION" --index-url "$CPU_INDEX") ;;
  cuda) torch_args=("torch==$TORCH_VERSION") ;;
  *) echo "setup.sh: GLM5_SETUP_DEVICE=$device is not cpu or cuda" >&2; exit 2 ;;
esac

if [ "$mode" = dry-run ]; then
  report=${GLM5_SETUP_REPORT:-$(mktemp -t glm5-setup-report.XXXXXX.json)}
  echo "+ $PY -m pip install ${torch_args[*]}"
  "$PY" -m pip install --dry-run --ignore-installed --quiet --report "$report" "${torch_args[@]}"
  echo "setup.sh: dry run; pip's resolution of the torch step is in $report"
elif [ "$mode" = print ] || ! "$PY" -c "import torch" 2>/dev/null; then
  if [ "$mode" = install ] && [ "$device" = cpu ]; then
    echo "+ $PY -m pip install ${torch_args[*]}"
    if ! "$PY" -m pip install "${torch_args[@]}"; then
      echo "setup.sh: $CPU_INDEX could not be reached; installing torch==$TORCH_VERSION from the default" \
           "index instead (on Linux x86_64 PyPI that is the multi-GB CUDA build)" >&2
      "$PY" -m pip install "torch==$TORCH_VERSION"
    fi
  else
    run "$PY" -m pip install "${torch_args[@]}"
  fi
fi

if [ "$extra" = "[npu]" ]; then
  run "$PY" -m pip install -e .
  # torch_npu X.Y.Z(.postN) goes with torch X.Y.Z only; CANN must match torch_npu (9.2.0 for 2.13.0).
  if [ "$mode" = install ]; then
    installed=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
  else
    installed=$TORCH_VERSION
  fi
  run "$PY" -m pip install "torch_npu==$installed.*"
else
  run "$PY" -m pip install -e ".${extra}"
fi
# Tests: with Triton present, a host without a GPU still checks the cuda kernels (Triton's CPU
# interpreter) and compiles the Hopper kernel for sm_90. Optional: without it those tests skip.
if [ "$mode" = install ] && [ "$extra" = "[dev]" ] && [ "$(uname -m)" = "x86_64" ] \
   && ! "$PY" -c "import triton" 2>/dev/null; then
  # Gluon's API moves between releases: the versions the Hopper kernel was checked with.
  "$PY" -m pip install "triton>=3.6,<3.10" \
    || echo "setup.sh: triton not installed; the cuda kernel checks will be skipped" >&2
fi
