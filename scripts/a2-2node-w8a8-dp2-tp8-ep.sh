#!/usr/bin/env bash
# GLM-5 W8A8 on two Atlas 800 A2 nodes: DP2 x TP8 with expert parallelism over all 16 NPUs.
#
# NOTE: this engine cannot load W8A8 checkpoints yet (quantized weight loading is separate, unfinished
# work). The script is ready for the day it can: the launch path, environment and rank table are the
# ones this layout needs.
#
# Run the same command on both nodes; each finds itself by its address (or set NODE_RANK).
#   NODE0_ADDR=10.0.0.1 NODE1_ADDR=10.0.0.2 IFNAME=enp67s0f5 NODE0_DEVICE_IPS=... NODE1_DEVICE_IPS=... \
#   MODEL=/data/GLM-5-w8a8 bash scripts/a2-2node-w8a8-dp2-tp8-ep.sh     # DRY_RUN=1 prints, starts nothing
#
# Settings (environment variables, defaults in brackets):
#   MODEL [/root/.cache/GLM-5-w8a8]   checkpoint directory, the same path on both nodes
#   NODE0_ADDR, NODE1_ADDR (required) host addresses; node 0 serves HTTP and hosts the rendezvous store
#   NODE0_HOST [a2-node0], NODE1_HOST [a2-node1]
#   IFNAME (required)                 host NIC carrying those addresses (ip -o addr)
#   HCCL_VIA [ifname]                 ifname: HCCL_SOCKET_IFNAME (needed on direct-out RoCE); if_ip: HCCL_IF_IP
#   NODEn_DEVICE_IPS                  comma list of node n's 8 NPU NIC IPs (hccn_tool -i D -ip -g); every
#                                     node's rank table needs both nodes'
#   MASTER_PORT [29501], HOST [0.0.0.0], PORT [8000], SERVED_MODEL_NAME [glm-5], EXTRA_ARGS []
#   OUTPUT_DIR [./glm5-launch], NODE_RANK [], DRY_RUN [], GLM5_ASCEND [glm5-ascend]
set -euo pipefail

MODEL=${MODEL:-/root/.cache/GLM-5-w8a8}
NODE0_ADDR=${NODE0_ADDR:?set NODE0_ADDR to node 0\'s host address}
NODE1_ADDR=${NODE1_ADDR:?set NODE1_ADDR to node 1\'s host address}
NODE0_HOST=${NODE0_HOST:-a2-node0}
NODE1_HOST=${NODE1_HOST:-a2-node1}
IFNAME=${IFNAME:?set IFNAME to the host NIC that carries the node addresses (ip -o addr)}
HCCL_VIA=${HCCL_VIA:-ifname}
MASTER_PORT=${MASTER_PORT:-29501}
HOST=${HOST:-0.0.0.0}
PORT=${PORT:-8000}
SERVED_MODEL_NAME=${SERVED_MODEL_NAME:-glm-5}
EXTRA_ARGS=${EXTRA_ARGS:-}
OUTPUT_DIR=${OUTPUT_DIR:-./glm5-launch}
GLM5_ASCEND=${GLM5_ASCEND:-glm5-ascend}
command -v "$GLM5_ASCEND" >/dev/null 2>&1 || GLM5_ASCEND="${PYTHON:-python3} -m glm5_ascend.cli"

node() {  # host address device_ips
  echo "  - host: \"$1\""
  echo "    address: \"$2\""
  if [ -n "$3" ]; then echo "    device_ips: [$3]"; fi
}

mkdir -p "$OUTPUT_DIR"
desc="$OUTPUT_DIR/cluster.yaml"
{
  echo "device: a2"
  echo "model: \"$MODEL\""
  echo "devices_per_node: 8"
  echo "layout: {tensor_parallel_size: 8, data_parallel_size: 2, enable_expert_parallel: true}"
  echo "master_port: $MASTER_PORT"
  echo "http: {host: \"$HOST\", port: $PORT}"
  echo "network: {ifname: \"$IFNAME\", hccl: $HCCL_VIA}"
  printf 'serve_args: [--served-model-name, "%s"' "$SERVED_MODEL_NAME"
  for a in $EXTRA_ARGS; do printf ', "%s"' "$a"; done
  echo "]"
  echo "nodes:"
  node "$NODE0_HOST" "$NODE0_ADDR" "${NODE0_DEVICE_IPS:-}"
  node "$NODE1_HOST" "$NODE1_ADDR" "${NODE1_DEVICE_IPS:-}"
} > "$desc"

# shellcheck disable=SC2086  # GLM5_ASCEND may be "python3 -m glm5_ascend.cli"
exec $GLM5_ASCEND launch "$desc" --output-dir "$OUTPUT_DIR" ${DRY_RUN:+--dry-run} ${NODE_RANK:+--node-rank "$NODE_RANK"}
