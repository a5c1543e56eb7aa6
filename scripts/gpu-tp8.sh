#!/usr/bin/env bash
# GLM-5-FP8 on one 8-GPU node at TP8: the seed's line
#   serve zai-org/GLM-5-FP8 --tensor-parallel-size 8 --gpu-memory-utilization 0.85 --tool-call-parser glm47 \
#     --reasoning-parser glm45 --enable-auto-tool-choice --served-model-name glm-5
# through `glm5-ascend launch`.
#
# NOTE: this engine cannot load FP8 checkpoints yet (quantized weight loading is separate, unfinished
# work); point MODEL at a BF16 GLM-5 directory to serve today.
#
#   bash scripts/gpu-tp8.sh                 # serve on this host
#   DRY_RUN=1 bash scripts/gpu-tp8.sh       # print the environment and command; start nothing
#
# Settings (environment variables, defaults in brackets):
#   MODEL [zai-org/GLM-5-FP8]   checkpoint (a local directory: the launch preflight reads its config.json)
#   NODE0_HOST [hostname], NODE0_ADDR [first address of `hostname -I`], GPU_IDS [0,1,2,3,4,5,6,7]
#   HOST [0.0.0.0], PORT [8000], GPU_MEMORY_UTILIZATION [0.85], SERVED_MODEL_NAME [glm-5], EXTRA_ARGS []
#   OUTPUT_DIR [./glm5-launch], DRY_RUN [], GLM5_ASCEND [glm5-ascend]
set -euo pipefail

MODEL=${MODEL:-zai-org/GLM-5-FP8}
NODE0_HOST=${NODE0_HOST:-$(hostname)}
NODE0_ADDR=${NODE0_ADDR:-$(hostname -I 2>/dev/null | awk '{print $1}')}
NODE0_ADDR=${NODE0_ADDR:-127.0.0.1}
GPU_IDS=${GPU_IDS:-0,1,2,3,4,5,6,7}
HOST=${HOST:-0.0.0.0}
PORT=${PORT:-8000}
GPU_MEMORY_UTILIZATION=${GPU_MEMORY_UTILIZATION:-0.85}
SERVED_MODEL_NAME=${SERVED_MODEL_NAME:-glm-5}
EXTRA_ARGS=${EXTRA_ARGS:-}
OUTPUT_DIR=${OUTPUT_DIR:-./glm5-launch}
GLM5_ASCEND=${GLM5_ASCEND:-glm5-ascend}
command -v "$GLM5_ASCEND" >/dev/null 2>&1 || GLM5_ASCEND="${PYTHON:-python3} -m glm5_ascend.cli"

mkdir -p "$OUTPUT_DIR"
desc="$OUTPUT_DIR/cluster.yaml"
{
  echo "device: cuda"
  echo "model: \"$MODEL\""
  echo "devices_per_node: 8"
  echo "layout: {tensor_parallel_size: 8}"
  echo "http: {host: \"$HOST\", port: $PORT}"
  printf 'serve_args: [--gpu-memory-utilization, "%s", --tool-call-parser, glm47, --reasoning-parser, glm45, ' \
    "$GPU_MEMORY_UTILIZATION"
  printf -- '--enable-auto-tool-choice, --served-model-name, "%s"' "$SERVED_MODEL_NAME"
  for a in $EXTRA_ARGS; do printf ', "%s"' "$a"; done
  echo "]"
  echo "nodes:"
  echo "  - host: \"$NODE0_HOST\""
  echo "    address: \"$NODE0_ADDR\""
  echo "    device_ids: [$GPU_IDS]"
} > "$desc"

# shellcheck disable=SC2086  # GLM5_ASCEND may be "python3 -m glm5_ascend.cli"
exec $GLM5_ASCEND launch "$desc" --output-dir "$OUTPUT_DIR" ${DRY_RUN:+--dry-run}
