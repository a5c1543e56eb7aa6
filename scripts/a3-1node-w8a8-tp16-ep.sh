#!/usr/bin/env bash
# GLM-5 W8A8 on one Atlas 800 A3 node: TP16 with expert parallelism over the node's 16 dies.
#
# NOTE: this engine cannot load W8A8 checkpoints yet (quantized weight loading is separate, unfinished
# work). The script is ready for the day it can: the launch path, environment and rank table are the
# ones this layout needs.
#
#   MODEL=/data/GLM-5-w8a8 bash scripts/a3-1node-w8a8-tp16-ep.sh            # start serving on this node
#   DRY_RUN=1 MODEL=/data/GLM-5-w8a8 bash scripts/a3-1node-w8a8-tp16-ep.sh  # print env, rank table, command
#
# Settings (environment variables, defaults in brackets):
#   MODEL [/root/.cache/GLM-5-w8a8]   checkpoint directory
#   NODE0_HOST [hostname], NODE0_ADDR [first address of `hostname -I`]
#   IFNAME []                         host NIC (HCCL_SOCKET_IFNAME, GLOO/TP_SOCKET_IFNAME); optional on one node
#   DEVICE_IPS [] / SUPER_DEVICE_IDS [] / SUPER_POD_ID []
#                                     comma lists of the 16 dies' vNIC IPs / SDIDs; read from hccn_tool and
#                                     npu-smi on the node when left empty
#   HOST [0.0.0.0], PORT [8000], SERVED_MODEL_NAME [glm-5], EXTRA_ARGS []  (more `serve` flags)
#   OUTPUT_DIR [./glm5-launch]        where cluster.yaml, node0.env, node0.ranktable.json, node0.cmd go
#   DRY_RUN [], GLM5_ASCEND [glm5-ascend]
set -euo pipefail

MODEL=${MODEL:-/root/.cache/GLM-5-w8a8}
NODE0_HOST=${NODE0_HOST:-$(hostname)}
NODE0_ADDR=${NODE0_ADDR:-$(hostname -I 2>/dev/null | awk '{print $1}')}
NODE0_ADDR=${NODE0_ADDR:-127.0.0.1}
IFNAME=${IFNAME:-}
DEVICE_IPS=${DEVICE_IPS:-}
SUPER_DEVICE_IDS=${SUPER_DEVICE_IDS:-}
SUPER_POD_ID=${SUPER_POD_ID:-}
HOST=${HOST:-0.0.0.0}
PORT=${PORT:-8000}
SERVED_MODEL_NAME=${SERVED_MODEL_NAME:-glm-5}
EXTRA_ARGS=${EXTRA_ARGS:-}
OUTPUT_DIR=${OUTPUT_DIR:-./glm5-launch}
GLM5_ASCEND=${GLM5_ASCEND:-glm5-ascend}
command -v "$GLM5_ASCEND" >/dev/null 2>&1 || GLM5_ASCEND="${PYTHON:-python3} -m glm5_ascend.cli"

mkdir -p "$OUTPUT_DIR"
desc="$OUTPUT_DIR/cluster.yaml"
{
  echo "device: a3"
  echo "model: \"$MODEL\""
  echo "devices_per_node: 16"
  echo "layout: {tensor_parallel_size: 16, enable_expert_parallel: true}"
  echo "http: {host: \"$HOST\", port: $PORT}"
  if [ -n "$IFNAME" ]; then echo "network: {ifname: \"$IFNAME\", hccl: ifname}"; fi
  printf 'serve_args: [--served-model-name, "%s"' "$SERVED_MODEL_NAME"
  for a in $EXTRA_ARGS; do printf ', "%s"' "$a"; done
  echo "]"
  echo "nodes:"
  echo "  - host: \"$NODE0_HOST\""
  echo "    address: \"$NODE0_ADDR\""
  if [ -n "$DEVICE_IPS" ]; then echo "    device_ips: [$DEVICE_IPS]"; fi
  if [ -n "$SUPER_DEVICE_IDS" ]; then echo "    super_device_ids: [$SUPER_DEVICE_IDS]"; fi
  if [ -n "$SUPER_POD_ID" ]; then echo "    super_pod_id: \"$SUPER_POD_ID\""; fi
} > "$desc"

# shellcheck disable=SC2086  # GLM5_ASCEND may be "python3 -m glm5_ascend.cli"
exec $GLM5_ASCEND launch "$desc" --output-dir "$OUTPUT_DIR" ${DRY_RUN:+--dry-run}
