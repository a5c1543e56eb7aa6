#!/usr/bin/env bash
# The decode table of docs/benchmarks.md: `glm5-ascend bench latency` on the GLM-5-width model cut to
# 4 layers (1 dense + 3 MoE, 31.9B parameters, bf16, random weights: --load-format dummy), one GPU.
#   scripts/bench_decode.sh OUTDIR CASE...   CASE: b1 b16 b64 (graphs), b1-eager b16-eager,
#                                            depth4 depth8 (64 experts, so 8 layers fit 80 GB), hf-b1,
#                                            w8a8-b1 w8a8-b64 (random int8 weights, msmodelslim W8A8),
#                                            e64-b1 w8a8-e64-b1 w8a8-e64-b16 (64 experts: fit an 80 GB H100;
#                                            their bf16 batch-16 twin is depth4)
# Each case writes OUTDIR/CASE.json and OUTDIR/CASE.log.
set -u
out=${1:?usage: bench_decode.sh OUTDIR CASE...}; shift
mkdir -p "$out" /tmp/glm5-config && cp "$(dirname "$0")/../tests/data/glm5-config.json" /tmp/glm5-config/config.json
L4='{"num_hidden_layers": 4, "first_k_dense_replace": 1, "num_nextn_predict_layers": 0}'
W8A8='{"num_hidden_layers": 4, "first_k_dense_replace": 1, "num_nextn_predict_layers": 0, "quantization_config": {"quant_method": "msmodelslim"}}'
E64='{"num_hidden_layers": 4, "first_k_dense_replace": 1, "num_nextn_predict_layers": 0, "n_routed_experts": 64}'
W8A8_E64='{"num_hidden_layers": 4, "first_k_dense_replace": 1, "num_nextn_predict_layers": 0, "n_routed_experts": 64, "quantization_config": {"quant_method": "msmodelslim"}}'
run() {  # name, overrides, extra flags...
  local name=$1 over=$2; shift 2
  echo "== $name: glm5-ascend bench latency --model /tmp/glm5-config --load-format dummy --hf-overrides '$over' $*"
  timeout 900 glm5-ascend bench latency --model /tmp/glm5-config --load-format dummy --skip-tokenizer-init \
    --hf-overrides "$over" --max-num-seqs 64 --max-model-len 8448 --num-iters-warmup 1 \
    --output-json "$out/$name.json" "$@" 2>&1 | grep -v " INFO " | tee "$out/$name.log"
}
for case in "$@"; do
  case $case in
    b1) run b1 "$L4" --batch-size 1 --input-len 2000 --output-len 96 --num-iters 3 ;;
    b1-eager) run b1-eager "$L4" --batch-size 1 --input-len 2000 --output-len 96 --num-iters 3 --enforce-eager ;;
    b16) run b16 "$L4" --batch-size 16 --input-len 1024 --output-len 64 --num-iters 3 ;;
    b16-eager) run b16-eager "$L4" --batch-size 16 --input-len 1024 --output-len 64 --num-iters 3 --enforce-eager ;;
    b64) run b64 "$L4" --batch-size 64 --input-len 8144 --output-len 96 --num-iters 2 ;;
    depth4) run depth4 "$E64" --batch-size 16 --input-len 1024 --output-len 64 --num-iters 3 ;;
    depth8) run depth8 '{"num_hidden_layers": 8, "first_k_dense_replace": 1, "num_nextn_predict_layers": 0, "n_routed_experts": 64}' \
              --batch-size 16 --input-len 1024 --output-len 64 --num-iters 3 ;;
    hf-b1) run hf-b1 "$L4" --batch-size 1 --input-len 2000 --output-len 32 --num-iters 1 --compare-transformers ;;
    w8a8-b1) run w8a8-b1 "$W8A8" --batch-size 1 --input-len 2000 --output-len 96 --num-iters 3 ;;
    w8a8-b64) run w8a8-b64 "$W8A8" --batch-size 64 --input-len 1024 --output-len 64 --num-iters 2 ;;
    e64-b1) run e64-b1 "$E64" --batch-size 1 --input-len 2000 --output-len 96 --num-iters 3 ;;
    w8a8-e64-b1) run w8a8-e64-b1 "$W8A8_E64" --batch-size 1 --input-len 2000 --output-len 96 --num-iters 3 ;;
    w8a8-e64-b16) run w8a8-e64-b16 "$W8A8_E64" --batch-size 16 --input-len 1024 --output-len 64 --num-iters 3 ;;
    *) echo "unknown case $case"; exit 2 ;;
  esac
done
