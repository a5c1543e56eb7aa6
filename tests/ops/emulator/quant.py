"""Emulated W8A8 kernels: npu_dynamic_quant and npu_quant_matmul (the quantized npu_grouped_matmul is in moe.py).

Signatures are the torch-npu 2.13 schema (npu_native_functions_by_codegen.yaml); rules and math from
the wheel's _op_plugin_docs.py, cited per rule:
  [dq]  npu_dynamic_quant: "scale=rowMax(abs(x))/DTYPE_MAX; y=round(x/scale)"; "x ... 数据类型支持torch.float16、
        torch.bfloat16"; "输入x的维度必须大于1"; "scale ... 数据类型为float32, 形状为x的形状剔除最后一维";
        dst_type "传None时当做torch.int8处理"
  [qmm] npu_quant_matmul: "shape需要在2-6维范围"; A2/A3 table, per-token column: x1 int8, x2 int8, scale
        float32/bfloat16, offset None, pertoken_scale float32, output_dtype bfloat16/float16; scale "shape需要是
        1维(t, ), t=1或n"; pertoken_scale "shape需要是1维(m,)"; "x1与x2最后一维的shape大小不能超过65535"
Options the npu backend never passes (smooth scales, int4, offsets, bias, int64 scales) raise EmulatorLimit.
"""
from __future__ import annotations

import torch

from .common import limit, require

QMM_LAST_DIM_LIMIT = 65535


def npu_dynamic_quant(input, *, smooth_scales=None, group_index=None, dst_type=None,  # noqa: A002 (official name)
                      quant_mode="pertoken", dst_type_max=0.0):
    """-> (y int8 like input, scale float32 input.shape[:-1])."""
    op = "npu_dynamic_quant"
    x = input
    require(x.dtype in (torch.float16, torch.bfloat16), op, f"x must be float16 or bfloat16, got {x.dtype}")
    require(x.dim() > 1, op, "the dimension of x must be greater than 1")
    limit(smooth_scales is None and group_index is None, op, "no smooth_scales / group_index")
    limit(dst_type in (None, torch.int8) and quant_mode == "pertoken" and dst_type_max == 0.0, op,
          "int8 per-token quantization")
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / 127.0
    # The formula divides by 0 for an all-zero row; its y is 0 here.
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = torch.round(xf / safe.unsqueeze(-1)).clamp_(-128, 127).to(torch.int8)
    return y, scale


def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None,
                     x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None,
                     y_scale=None):
    """Per-token form: x1 int8 [M, K] @ x2 int8 [K, N] * scale [N] * pertoken_scale [M] -> [M, N] output_dtype."""
    op = "npu_quant_matmul"
    require(2 <= x1.dim() <= 6 and 2 <= x2.dim() <= 6, op, "x1 and x2 must have 2 to 6 dims")
    require(x1.dtype == torch.int8 and x2.dtype == torch.int8, op, "x1 and x2 must be int8 (the int8 table rows)")
    limit(x1.dim() == 2 and x2.dim() == 2, op, "2-D x1 and x2")
    limit(offset is None and bias is None and y_scale is None and group_sizes is None, op, "no offset, bias, "
          "y_scale or group_sizes")
    limit(all(d is None for d in (x1_dtype, x2_dtype, pertoken_scale_dtype, scale_dtype)), op, "no *_dtype options")
    M, K = x1.shape
    require(x2.shape[0] == K, op, f"x1 [M, K={K}] and x2 [K, N] disagree: x2 is {list(x2.shape)}")
    N = x2.shape[1]
    require(K <= QMM_LAST_DIM_LIMIT and N <= QMM_LAST_DIM_LIMIT, op, "the last dims of x1 and x2 must be <= 65535")
    require(scale.dim() == 1 and scale.shape[0] in (1, N), op, f"scale must be 1-D of size 1 or n={N}")
    limit(scale.dtype in (torch.float32, torch.bfloat16), op, "a float32 / bfloat16 scale (int64 needs "
          "npu_trans_quant_param)")
    limit(pertoken_scale is not None, op, "the per-token form (pertoken_scale given)")
    require(pertoken_scale.dtype == torch.float32 and pertoken_scale.shape == (M,), op,
            f"pertoken_scale must be float32 [m={M}]")
    require(output_dtype in (torch.bfloat16, torch.float16), op, "with pertoken_scale, output_dtype is bfloat16 "
            "or float16")
    acc = x1.to(torch.int64) @ x2.to(torch.int64)
    return (acc.float() * scale.float()[None, :] * pertoken_scale[:, None]).to(output_dtype)
