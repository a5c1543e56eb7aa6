"""W8A8 ops: the reference against an error bound, the npu backend (real or emulated) against the reference."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from glm5_ascend import ops
from glm5_ascend.ops.quant import reference


def _weights(n, k, gen, device):
    w = torch.randn(n, k, generator=gen) * 0.05
    scale = w.abs().amax(1) / 127
    return torch.round(w / scale[:, None]).to(torch.int8).to(device), scale.to(device)


def test_reference_w8a8_linear_within_the_per_token_rounding_bound():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 96, generator=gen, dtype=torch.float64)
    q, s = _weights(40, 96, gen, "cpu")
    w = q.double() * s.double()[:, None]
    y = reference.w8a8_linear(x.float(), q, s).double()
    # Each activation moves by at most half its token's step (max|x_t| / 127 / 2): |err| <= step * sum_k |w_nk|.
    step = x.abs().amax(1, keepdim=True) / 127 / 2
    bound = step * w.abs().sum(1)[None, :] + 1e-4
    assert ((y - x @ w.t()).abs() <= bound).all()
    assert torch.equal(reference.int8_matmul(q[:5], q), (q[:5].long() @ q.long().t()).int())
    zero = reference.w8a8_linear(torch.zeros(2, 96), q, s)
    assert torch.equal(zero, torch.zeros(2, 40))  # an all-zero token: scale 0, output 0, no NaN


def test_reference_grouped_mlp_w8a8_equals_per_expert_linears():
    gen = torch.Generator().manual_seed(1)
    E, D, inter = 4, 64, 32
    w13 = [_weights(2 * inter, D, gen, "cpu") for _ in range(E)]
    w2 = [_weights(D, inter, gen, "cpu") for _ in range(E)]
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(int(counts.sum()), D, generator=gen)
    out = reference.grouped_mlp_w8a8(x, counts, torch.stack([a for a, _ in w13]), torch.stack([b for _, b in w13]),
                                     torch.stack([a for a, _ in w2]), torch.stack([b for _, b in w2]))
    start = 0
    for e, c in enumerate(counts.tolist()):
        xe = x[start:start + c]
        h = reference.w8a8_linear(xe, *w13[e])
        a = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        assert torch.allclose(out[start:start + c], reference.w8a8_linear(a, *w2[e]), atol=1e-6)
        start += c


def test_reference_w8a8_keeps_bfloat16_and_empty_inputs():
    gen = torch.Generator().manual_seed(5)
    E, D, inter = 3, 48, 40  # D != 2 * inter: the gate/up split is read from w13's rows
    w13 = [_weights(2 * inter, D, gen, "cpu") for _ in range(E)]
    w2 = [_weights(D, inter, gen, "cpu") for _ in range(E)]
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(5, D, generator=gen).bfloat16()
    out = reference.grouped_mlp_w8a8(x, counts, torch.stack([a for a, _ in w13]), torch.stack([b for _, b in w13]),
                                     torch.stack([a for a, _ in w2]), torch.stack([b for _, b in w2]))
    assert out.dtype == torch.bfloat16 and out.shape == (5, D)
    for e, rows in ((0, slice(0, 2)), (2, slice(2, 5))):
        h = reference.w8a8_linear(x[rows], *w13[e])
        assert h.dtype == torch.bfloat16
        a = (torch.nn.functional.silu(h[:, :inter].float()) * h[:, inter:].float()).bfloat16()
        assert torch.equal(out[rows], reference.w8a8_linear(a, *w2[e]))
    empty = reference.int8_matmul(torch.zeros(0, D, dtype=torch.int8), w13[0][0])
    assert empty.shape == (0, 2 * inter) and empty.dtype == torch.int32


def test_checks_name_the_argument():
    q, s = _weights(8, 16, torch.Generator().manual_seed(0), "cpu")
    with pytest.raises(ValueError, match=r"w8a8_linear: weight_scale must be float32 \[8\]"):
        ops.w8a8_linear(torch.randn(2, 16), q, s[:4])
    with pytest.raises(ValueError, match=r"w8a8_linear: weight must be an int8 2-D tensor"):
        ops.w8a8_linear(torch.randn(2, 16), q.float(), s)
    with pytest.raises(ValueError, match=r"x must be \[..., K=16\]"):
        ops.w8a8_linear(torch.randn(2, 15), q, s)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_npu_w8a8_linear_equals_reference(npu_backend, device, dtype):
    gen = torch.Generator().manual_seed(2)
    q, s = _weights(48, 64, gen, device)
    x = (torch.randn(2, 5, 64, generator=gen)).to(dtype).to(device)
    before = npu_backend.calls["npu_quant_matmul"]
    got = ops.w8a8_linear(x, q, s)
    assert npu_backend.calls["npu_quant_matmul"] == before + 1 and got.shape == (2, 5, 48) and got.dtype == dtype
    assert torch.equal(got.cpu(), reference.w8a8_linear(x.cpu(), q.cpu(), s.cpu()))


def test_npu_grouped_mlp_w8a8_equals_reference(npu_backend, device):
    gen = torch.Generator().manual_seed(3)
    E, D, inter = 4, 64, 32
    w13 = [_weights(2 * inter, D, gen, device) for _ in range(E)]
    w2 = [_weights(D, inter, gen, device) for _ in range(E)]
    args = (torch.stack([a for a, _ in w13]), torch.stack([b for _, b in w13]),
            torch.stack([a for a, _ in w2]), torch.stack([b for _, b in w2]))
    counts = torch.tensor([3, 0, 5, 2], device=device)
    x = torch.randn(12, D, generator=gen).to(torch.bfloat16).to(device)  # 2 padding rows past sum(counts)
    before = npu_backend.calls["npu_grouped_matmul"]
    got = ops.grouped_mlp_w8a8(x, counts, *args)
    assert npu_backend.calls["npu_grouped_matmul"] == before + 2
    want = reference.grouped_mlp_w8a8(x.cpu(), counts.cpu(), *(a.cpu() for a in args))
    assert torch.equal(got[:10].cpu(), want)


def test_emulated_per_token_gmm_holds_its_documented_dtypes(npu_backend, device):
    if not getattr(npu_backend, "EMULATED", False):
        pytest.skip("emulator rules")
    x = torch.zeros(4, 16, dtype=torch.int8)
    w = torch.zeros(2, 16, 8, dtype=torch.int8)
    kw = dict(scale=[torch.ones(2, 8)], per_token_scale=[torch.ones(4)], group_list=torch.tensor([2, 2]),
              split_item=3, group_type=0, group_list_type=1)
    with pytest.raises(RuntimeError, match="output_dtype is bfloat16 or float16"):
        npu_backend.npu_grouped_matmul([x], [w], output_dtype=torch.float32, **kw)
    with pytest.raises(RuntimeError, match=r"scale must be \[tensor \[E=2, N=8\]"):
        npu_backend.npu_grouped_matmul([x], [w], output_dtype=torch.bfloat16, **{**kw, "scale": [torch.ones(8)]})
    with pytest.raises(RuntimeError, match="x must be float16 or bfloat16"):
        npu_backend.npu_dynamic_quant(torch.zeros(2, 4))


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(not (torch.cuda.is_available() or _INTERPRET), reason="needs a CUDA GPU or Triton's interpreter")
@pytest.mark.parametrize("counts,pad,D,inter", [
    ([3, 0, 5, 2], 2, 64, 32),         # decode-sized: 16-row tiles; K not a multiple of the 128 K step
    ([70, 1, 0, 90], 5, 256, 128),     # prefill-sized: 64-row tiles, rows past one tile, even K
])
def test_cuda_grouped_mlp_w8a8_equals_reference(counts, pad, D, inter):
    """The Triton W8A8 grouped GEMM (ops/quant/cuda.py) against the reference: int32 products exact, the
    dequantization rounded alike; only SwiGLU's sigmoid may differ in the last bit (then requantized)."""
    from glm5_ascend.ops.quant import cuda
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32  # the interpreter multiplies no bf16
    gen = torch.Generator().manual_seed(4)
    E = len(counts)
    w13 = [_weights(2 * inter, D, gen, dev) for _ in range(E)]
    w2 = [_weights(D, inter, gen, dev) for _ in range(E)]
    args = (torch.stack([a for a, _ in w13]), torch.stack([b for _, b in w13]),
            torch.stack([a for a, _ in w2]), torch.stack([b for _, b in w2]))
    c = torch.tensor(counts, device=dev)
    n = sum(counts)
    x = torch.randn(n + pad, D, generator=gen).to(dtype).to(dev)  # `pad` rows past sum(counts): unspecified
    got = cuda.grouped_mlp_w8a8(x, c, *args)[:n].float().cpu()
    want = reference.grouped_mlp_w8a8(x.cpu(), c.cpu(), *(a.cpu() for a in args)).float()
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < (1e-2 if dtype == torch.bfloat16 else 1e-5), rel
    if dtype == torch.float32:
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
