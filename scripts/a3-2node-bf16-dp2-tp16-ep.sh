#!/usr/bin/env bash
# GLM-5 BF16 on two Atlas 800 A3 nodes: DP2 x TP16 with expert parallelism over all 32 dies.
# Run the same command on both nodes; each finds itself by its address (or set NODE_RANK).
#
#   NODE0_ADDR=10.0.0.1 NODE1_ADDR=10.0.0.2 IFNAME=enp189s0f0 \
#   NODE0_DEVICE_IPS=... NODE1_DEVICE_IPS=... NODE0_SUPER_DEVICE_IDS=... NODE1_SUPER_DEVICE_IDS=... SUPER_POD_ID=0 \
#   MODEL=/data/GLM-5 bash scripts/a3-2node-bf16-dp2-tp16-ep.sh        # DRY_RUN=1 prints, starts nothing
#
# Settings (environment variables, defaults in brackets):
#   MODEL [/root/.cache/GLM-5]        BF16 checkpoint directory, the same path on both nodes
#   NODE0_ADDR, NODE1_ADDR (required) host addresses; node 0 serves HTTP and hosts the rendezvous store
#   NODE0_HOST [a3-node0], NODE1_HOST [a3-node1]
#   IFNAME (required)                 host NIC carrying those addresses (ip -o addr)
#   HCCL_VIA [ifname]                 ifname: HCCL_SOCKET_IFNAME (needed on direct-out RoCE); if_ip: HCCL_IF_IP
#   NODEn_DEVICE_IPS, NODEn_SUPER_DEVICE_IDS
#                                     comma lists of node n's 16 vNIC IPs (hccn_tool -i D -vnic -g) and SDIDs
#                                     (npu-smi info -t spod-info); every node's rank table needs both nodes'
#   SUPER_POD_ID [], NODEn_SUPER_POD_ID [SUPER_POD_ID]
#   MASTER_PORT [29501], HOST [0.0.0.0], PORT [8000], SERVED_MODEL_NAME [glm-5], EXTRA_ARGS []
#   OUTPUT_DIR [./glm5-launch], NODE_RANK [], DRY_RUN [], GLM5_ASCEND [glm5-ascend]
set -euo pipefail

MODEL=${MODEL:-/root/.cache/GLM-5}
NODE0_ADDR=${NODE0_ADDR:?set NODE0_ADDR to node 0\'s host address}
NODE1_ADDR=${NODE1_ADDR:?set NODE1_ADDR to node 1\'s host address}
NODE0_HOST=${NODE0_HOST:-a3-node0}
NODE1_HOST=${NODE1_HOST:-a3-node1}
IFNAME=${IFNAME:?set IFNAME to the host NIC that carries the node addresses (ip -o addr)}
HCCL_VIA=${HCCL_VIA:-ifname}
SUPER_POD_ID=${SUPER_POD_ID:-}
NODE0_SUPER_POD_ID=${NODE0_SUPER_POD_ID:-$SUPER_POD_ID}
NODE1_SUPER_POD_ID=${NODE1_SUPER_POD_ID:-$SUPER_POD_ID}
MASTER_PORT=${MASTER_PORT:-29501}
HOST=${HOST:-0.0.0.0}
PORT=${PORT:-8000}
SERVED_MODEL_NAME=${SERVED_MODEL_NAME:-glm-5}
EXTRA_ARGS=${EXTRA_ARGS:-}
OUTPUT_DIR=${OUTPUT_DIR:-./glm5-launch}
GLM5_ASCEND=${GLM5_ASCEND:-glm5-ascend}
command -v "$GLM5_ASCEND" >/dev/null 2>&1 || GLM5_ASCEND="${PYTHON:-python3} -m glm5_ascend.cli"

node() {  # host address device_ips super_device_ids super_pod_id
  echo "  - host: \"$1\""
  echo "    address: \"$2\""
  if [ -n "$3" ]; then echo "    device_ips: [$3]"; fi
  if [ -n "$4" ]; then echo "    super_device_ids: [$4]"; fi
  if [ -n "$5" ]; then echo "    super_pod_id: \"$5\""; fi
}

mkdir -p "$OUTPUT_DIR"
desc="$OUTPUT_DIR/cluster.yaml"
{
  echo "device: a3"
  echo "model: \"$MODEL\""
  echo "devices_per_node: 16"
  echo "layout: {tensor_parallel_size: 16, data_parallel_size: 2, enable_expert_parallel: true}"
  echo "master_port: $MASTER_PORT"
  echo "http: {host: \"$HOST\", port: $PORT}"
  echo "network: {ifname: \"$IFNAME\", hccl: $HCCL_VIA}"
  printf 'serve_args: [--served-model-name, "%s"' "$SERVED_MODEL_NAME"
  for a in $EXTRA_ARGS; do printf ', "%s"' "$a"; done
  echo "]"
  echo "nodes:"
  node "$NODE0_HOST" "$NODE0_ADDR" "${NODE0_DEVICE_IPS:-}" "${NODE0_SUPER_DEVICE_IDS:-}" "$NODE0_SUPER_POD_ID"
  node "$NODE1_HOST" "$NODE1_ADDR" "${NODE1_DEVICE_IPS:-}" "${NODE1_SUPER_DEVICE_IDS:-}" "$NODE1_SUPER_POD_ID"
} > "$desc"

# shellcheck disable=SC2086  # GLM5_ASCEND may be "python3 -m glm5_ascend.cli"
exec $GLM5_ASCEND launch "$desc" --output-dir "$OUTPUT_DIR" ${DRY_RUN:+--dry-run} ${NODE_RANK:+--node-rank "$NODE_RANK"}
