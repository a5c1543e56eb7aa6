"""W8A8 operators on Ascend NPU (same functions and results as ops/quant/reference.py).

w8a8_linear: npu_dynamic_quant (per-token int8, scale = rowMax(|x|) / 127, y = round(x / scale)) then
npu_quant_matmul(x1 int8 [M, K], x2 int8 [K, N], scale float32 [N], pertoken_scale float32 [M],
output_dtype bf16 / fp16): y = x1 @ x2 * scale * pertoken_scale ("per-token" row of the A2/A3 dtype
table: x1/x2 int8, scale float32/bfloat16, pertoken_scale float32, output float16/bfloat16).
grouped_mlp_w8a8: the same quantization, then npu_grouped_matmul in its per-token quantized form
(x [int8], weight [int8 E x K x N], scale [E x N], per_token_scale [M], output_dtype bf16/fp16,
group_type 0; the form vllm-ascend's W8A8_DYNAMIC MoE calls), npu_swiglu, quantize, down projection.
Both ops take x in float16 / bfloat16 only (npu_dynamic_quant's documented input dtypes): a float32
model runs the reference here. Weights stay [N, K] / [E, N, K]; the transposed views are the ops'
[K, N] / [E, K, N] without a copy. No NPU has run this code yet; it is written against the torch-npu
2.13 signatures and docs and tested through the contract emulator (tests/ops/emulator/quant.py).
"""
from __future__ import annotations

import torch
import torch_npu

from glm5_ascend.ops.quant import reference

_NPU_DTYPES = (torch.float16, torch.bfloat16)
_INNER_LIMIT = 65535  # npu_quant_matmul: "x1与x2最后一维的shape大小不能超过65535"


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    if x.dtype not in _NPU_DTYPES or max(x.shape[-1], weight.shape[0]) > _INNER_LIMIT or x.numel() == 0:
        return reference.w8a8_linear(x, weight, weight_scale)
    lead = x.shape[:-1]
    q, s = torch_npu.npu_dynamic_quant(x.reshape(-1, x.shape[-1]))
    out = torch_npu.npu_quant_matmul(q, weight.t(), weight_scale, pertoken_scale=s, output_dtype=x.dtype)
    return out.reshape(*lead, weight.shape[0])


def _gmm(x: torch.Tensor, scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, counts: torch.Tensor,
         dtype: torch.dtype) -> torch.Tensor:
    # group_list_type=1: per-expert counts ("长度不能为1": a single expert is given as a cumsum, type 0).
    count_mode = counts.numel() > 1
    group_list = counts if count_mode else counts.cumsum(0)
    return torch_npu.npu_grouped_matmul([x], [w.transpose(1, 2)], scale=[w_scale], per_token_scale=[scale],
                                        group_list=group_list, split_item=3, group_type=0,
                                        group_list_type=1 if count_mode else 0, output_dtype=dtype)[0]


def grouped_mlp_w8a8(x, counts, w13, w13_scale, w2, w2_scale) -> torch.Tensor:
    """Rows past sum(counts) are padding; their output is unspecified (as grouped_mlp's)."""
    M, D = x.shape
    if M == 0:
        return x.new_empty((0, D))
    if x.dtype not in _NPU_DTYPES:
        return reference.grouped_mlp_w8a8(x, counts, w13, w13_scale, w2, w2_scale)
    counts = counts.to(torch.int64)
    q, s = torch_npu.npu_dynamic_quant(x)
    h = torch_npu.npu_swiglu(_gmm(q, s, w13, w13_scale, counts, x.dtype), dim=-1)
    q, s = torch_npu.npu_dynamic_quant(h)
    return _gmm(q, s, w2, w2_scale, counts, x.dtype)
