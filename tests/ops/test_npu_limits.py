"""The contract emulator's documented limits: for each rule, a call that must be refused and one that must pass.

Every rule is checked against the op documentation (quoted next to each case), not against the npu
backend. Sources:
  [sfa]      op-plugin docs/context/torch_npu-npu_sparse_flash_attention.md
  [li]       op-plugin docs/context/torch_npu-npu_lightning_indexer.md; CANN ops-transformer LightningIndexer
             README for the per-device head count
  [gating]   op-plugin docs/context/torch_npu-npu_moe_gating_top_k.md
  [gmm]      torch-npu 2.13.0 _op_plugin_docs.py, npu_grouped_matmul
  [routing]  op-plugin docs/context/torch_npu-npu_moe_init_routing_v2.md; CANN MoeInitRoutingV3 README
  [unperm]   op-plugin torch_npu.npu_moe_token_unpermute page
  [dispatch] op-plugin docs/context/torch_npu-npu_moe_distribute_dispatch_v2.md
  [combine]  op-plugin docs/context/torch_npu-npu_moe_distribute_combine_v2.md, CANN aclnnMoeDistributeCombineV2.md
These tests call the emulated ops directly, so they need no NPU and run where the emulator exists.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from glm5_ascend.ops.moe.mc2_limits import MC2_LIMITS
from tests.ops import emulator
from tests.ops.emulator import mc2, moe, profiles
from tests.ops.emulator.dsa import npu_lightning_indexer, npu_sparse_flash_attention

from .conftest import make_batch

pytestmark = pytest.mark.skipif(emulator.real_torch_npu_present(), reason="checks the emulator, not a real torch_npu")
BF16 = torch.bfloat16


# The refusal each case must give (so it is refused for the rule it tests, not another).
WHY = {
    'latent D 256': 'D must be 512', 'rope 32': 'query_rope', '3 heads': 'N1 must be one of',
    '256 heads': 'N1 must be one of', 'block 8': 'multiple of 16',
    'block 1040': 'block_size must be a multiple of 16 up to 1024',
    'attention_mode 0': 'attention_mode takes only 2', 'lse with PA_BSND': 'return_softmax_lse',
    'sparse_size 0': 'sparse_size', 'non-contiguous query': 'query must be contiguous',
    'padding first': 'padding at the end', 'index D 64': 'D must be 128', '65 heads': 'N1 must be <= 64',
    'fp32 weights': 'share a dtype', 'sparse_count 2049': 'sparse_count=2049', 'return_value': 'return_value',
    '4096 experts': '2048 experts', '2 per group': 'more than 2', 'align32': 'aligned up to 32',
    'k too big': '1 <= k <=', 'k_group too big': 'k_group <= group_count', 'renorm 1': 'renorm',
    'K 65536': 'below 65536', 'counts past M': 'at most M', 'one count': 'length 1',
    'decreasing cumsum': 'non-decreasing', 'active_num -1': 'active_num must equal', 'id past expert_num': 'lie in',
    'range past expert_num': 'active_expert_range', 'cumsum counts': 'expert_tokens_num_type', 'BS 257': 'BS<=256',
    'BS 513': 'BS<=512', 'BS 0': '0<BS', 'EP 8': 'one of', 'EP 1': '\\[2, 768\\]', 'EP 769': '\\[2, 768\\]',
    'H 7200': 'H on a2', 'H 1000': 'multiple of 32', 'H 1023': 'H on a3', 'H 8200': 'H on a3', 'K 17': '0<K<=16',
    '1040 experts': '\\[1, 1024\\]', 'uneven': 'divide by ep_world_size', '25 per rank': '<= 24',
}


def refused(fn, match=None):
    with pytest.raises(RuntimeError, match=match):
        fn()


# --- npu_sparse_flash_attention ---------------------------------------------------------------------

def sfa(H=2, D=512, Dr=64, bs=16, K=4, **kw):
    """A valid MLA-absorb decode call, with one thing changed through the arguments."""
    batch = make_batch([1], [5], bs)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, D, generator=gen).to(BF16)
    kv = batch.cache(D, BF16, "cpu", gen).view(batch.num_blocks, bs, 1, D)
    q_rope = torch.randn(1, H, Dr, generator=gen).to(BF16)
    k_rope = batch.cache(Dr, BF16, "cpu", gen).view(batch.num_blocks, bs, 1, Dr)
    idx = torch.tensor([[[0, 1, 2, 4] + [-1] * (K - 4)]], dtype=torch.int32)[..., :K]
    args = dict(query=q, key=kv, value=kv, sparse_indices=idx, scale_value=0.04, block_table=batch.block_tables,
                actual_seq_lengths_query=batch.cu_seqlens_q[1:], actual_seq_lengths_kv=batch.seq_lens,
                query_rope=q_rope, key_rope=k_rope, layout_query="TND", layout_kv="PA_BSND", attention_mode=2)
    args.update(kw)
    return lambda: npu_sparse_flash_attention(args.pop("query"), args.pop("key"), args.pop("value"),
                                              args.pop("sparse_indices"), args.pop("scale_value"), **args)


def test_sfa_passes_at_glm5_dims():
    out, mx, sm = sfa()()
    assert out.shape == (1, 2, 512) and mx.numel() == sm.numel() == 0


@pytest.mark.parametrize("case,call", [
    # [sfa] "参数query中的D和key、value的D值相等为512"
    ("latent D 256", lambda: sfa(D=256)),
    # [sfa] "参数query_rope中的D和key_rope的D值相等为64"
    ("rope 32", lambda: sfa(Dr=32)),
    # [sfa] query: "N1支持1/2/4/8/16/32/64/128"
    ("3 heads", lambda: sfa(H=3)),
    ("256 heads", lambda: sfa(H=256)),
    # [sfa] key: "block_size取值为16的倍数，最大支持1024"
    ("block 8", lambda: sfa(bs=8)),
    ("block 1040", lambda: sfa(bs=1040)),
    # [sfa] attention_mode: "仅支持传入2，表示MLA-absorb模式" (the mistake this emulator once shared: 0)
    ("attention_mode 0", lambda: sfa(attention_mode=0)),
    # [sfa] return_softmax_lse: "该参数仅在训练且layout_kv不为PA_BSND场景支持"
    ("lse with PA_BSND", lambda: sfa(return_softmax_lse=True)),
    # [sfa] sparse_indices: "需要满足sparse_size大于0"
    ("sparse_size 0", lambda: sfa(sparse_indices=torch.zeros(1, 1, 0, dtype=torch.int32))),
    # [sfa] query: "不支持非连续"
    ("non-contiguous query", lambda: sfa(query=torch.zeros(1, 512, 2, dtype=BF16).transpose(1, 2))),
    # [sfa] "需要保证每行有效值均在前半部分，无效值均在后半部分"
    ("padding first", lambda: sfa(sparse_indices=torch.tensor([[[-1, 0, 1, 2]]], dtype=torch.int32))),
])
def test_sfa_refuses(case, call):
    refused(call(), WHY[case])


@pytest.mark.parametrize("kw", [dict(H=1), dict(H=128), dict(bs=1024), dict(K=8)], ids=str)
def test_sfa_passes_at_the_bounds(kw):
    assert sfa(**kw)()[0].shape[1] == kw.get("H", 2)


# --- npu_lightning_indexer --------------------------------------------------------------------------

def li(H=2, D=128, bs=16, topk=4, w_dtype=BF16, **kw):
    batch = make_batch([1], [7], bs)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, H, D, generator=gen).to(BF16)
    key = batch.cache(D, BF16, "cpu", gen).view(batch.num_blocks, bs, 1, D)
    w = torch.randn(1, H, generator=gen).to(w_dtype)
    args = dict(actual_seq_lengths_query=batch.cu_seqlens_q[1:], actual_seq_lengths_key=batch.seq_lens,
                block_table=batch.block_tables, layout_query="TND", layout_key="PA_BSND", sparse_count=topk)
    args.update(kw)
    return lambda: npu_lightning_indexer(q, key, w, **args)


@pytest.mark.parametrize("case,call", [
    ("index D 64", lambda: li(D=64)),                   # [li] "参数query中的D和参数key中的D值相等为128"
    ("65 heads", lambda: li(H=65)),                     # [li] README, A3: "query N1支持小于等于64"
    ("fp32 weights", lambda: li(w_dtype=torch.float32)),  # [li] "参数query、key、weights的数据类型应保持一致"
    ("block 8", lambda: li(bs=8)),                      # [li] key: "block_size取值为16的整数倍，最大支持到1024"
    ("sparse_count 2049", lambda: li(topk=2049)),       # [li] sparse_count "支持1-2048以及3072、4096..." (2.13 wheel)
    ("return_value", lambda: li(return_value=True)),    # [li] "仅在训练且layout_kv不为PA_BSND场景支持"
])
def test_indexer_refuses(case, call):
    refused(call(), WHY[case])


@pytest.mark.parametrize("kw", [dict(), dict(H=64), dict(H=32), dict(bs=1024), dict(topk=2048), dict(topk=4096)],
                         ids=str)
def test_indexer_passes(kw):
    idx, _ = li(**kw)()
    assert idx.shape == (1, 1, kw.get("topk", 4))


# --- npu_moe_gating_top_k ---------------------------------------------------------------------------

def gating(E=16, k=4, group_count=4, k_group=2, **kw):
    x = torch.randn(3, E)
    return lambda: moe.npu_moe_gating_top_k(x, k, bias=torch.zeros(E), k_group=k_group, group_count=group_count,
                                            group_select_mode=1, norm_type=1, **kw)


@pytest.mark.parametrize("case,call", [
    ("4096 experts", lambda: gating(E=4096, group_count=1, k_group=1)),  # [gating] x: "专家数 ... 不大于2048"
    ("2 per group", lambda: gating(E=8)),          # [gating] group_count: "整除后的结果大于2"
    ("align32", lambda: gating(E=1320, group_count=40, k_group=4, k=8)),  # "按照32个数对齐后乘group_count ... 不大于2048"
    ("k too big", lambda: gating(k=9)),            # [gating] "1 <= k <= x_shape[-1] / group_count * k_group"
    ("k_group too big", lambda: gating(k_group=5)),  # [gating] "1 <= k_group <= group_count"
    ("renorm 1", lambda: gating(renorm=1)),        # [gating] renorm: "当前仅支持0"
])
def test_gating_refuses(case, call):
    refused(call(), WHY[case])


@pytest.mark.parametrize("kw", [dict(), dict(E=2048, group_count=1, k_group=1, k=8),
                                dict(E=1280, group_count=40, k_group=4, k=8),
                                dict(E=256, group_count=1, k_group=1, k=8)], ids=str)
def test_gating_passes(kw):
    y, ids, _ = gating(**kw)()
    assert ids.shape == (3, kw.get("k", 4))


# --- npu_grouped_matmul -----------------------------------------------------------------------------

def gmm(M=6, K=32, N=16, group_list=(3, 3), group_list_type=1):
    x = torch.randn(M, K).to(BF16)
    w = torch.randn(len(group_list), N, K).to(BF16).transpose(1, 2)  # the backend's transposed view
    return lambda: moe.npu_grouped_matmul([x], [w], group_list=torch.tensor(group_list), split_item=3, group_type=0,
                                          group_list_type=group_list_type)[0]


@pytest.mark.parametrize("case,call", [
    # [gmm] "内轴限制InnerLimit为65536 ... 每一组tensor的最后一维大小都应小于InnerLimit"
    ("K 65536", lambda: gmm(M=2, K=65536, N=2, group_list=(1, 1))),
    # [gmm] group_list indexes x's first dim: it cannot cover more than M rows
    ("counts past M", lambda: gmm(group_list=(4, 3))),
    # [gmm] "当group_list_type为1时，group_list必须为非负数列，且长度不能为1"
    ("one count", lambda: gmm(group_list=(6,))),
    # [gmm] "当group_list_type为0时，group_list必须为非负单调非递减数列"
    ("decreasing cumsum", lambda: gmm(group_list=(4, 3), group_list_type=0)),
])
def test_gmm_refuses(case, call):
    refused(call(), WHY[case])


def test_gmm_passes_with_padding_rows_and_below_the_inner_limit():
    out = gmm(group_list=(1, 3))()  # 4 of 6 rows: the last two are padding, left undefined
    assert out.shape == (6, 16) and bool(out[:4].isfinite().all()) and bool(out[4:].isnan().all())
    assert gmm(group_list=(6,), group_list_type=0)().shape == (6, 16)
    assert gmm(M=2, K=65535, N=2, group_list=(1, 1))().shape == (2, 2)


# --- npu_moe_init_routing_v2 and npu_moe_token_unpermute -------------------------------------------------

def routing(active_num=None, expert_num=5, end=5, ids=((0, 3), (4, 1), (2, 0)), tokens_type=1, **kw):
    ids = torch.tensor(ids, dtype=torch.int32)
    x = torch.randn(ids.shape[0], 8)
    active = ids.numel() if active_num is None else active_num
    return lambda: moe.npu_moe_init_routing_v2(x, ids, active_num=active, expert_num=expert_num,
                                               expert_tokens_num_type=tokens_type, expert_tokens_num_flag=True,
                                               quant_mode=-1, active_expert_range=[0, end], **kw)


@pytest.mark.parametrize("case,call", [
    ("active_num -1", lambda: routing(active_num=-1)),  # [routing] active_num: "校验需等于NUM_ROWS*K"
    ("id past expert_num", lambda: routing(expert_num=4, end=4)),  # [routing] expert_idx: "专家id不能超过专家数"
    ("range past expert_num", lambda: routing(end=6)),  # [routing] "expert_end不大于expert_num"
    ("cumsum counts", lambda: routing(tokens_type=0)),  # [routing] expert_tokens_num_type "当前仅支持1和2"
])
def test_routing_refuses(case, call):
    refused(call(), WHY[case])


def test_routing_gather_index_is_what_unpermute_takes():
    """[routing] row_idx_type 0: "expandedRowIdxOut[sortedRowIdx[i]]=i", "无效数据由-1填充"; [unperm]
    sorted_indices: "取值范围是[0, tokens_num * topK_num - 1]，且没有重复索引"."""
    x, row_idx, counts, _ = routing(row_idx_type=0)()
    assert sorted(row_idx.tolist()) == list(range(6)) and counts.tolist() == [2, 1, 1, 1, 1]
    out = moe.npu_moe_token_unpermute(x, row_idx, probs=torch.ones(3, 2))
    assert out.shape == (3, 8)
    _, partial, _, _ = routing(end=4, row_idx_type=0)()  # expert 4 outside the range: -1 in its slot
    assert partial.tolist().count(-1) == 1
    refused(lambda: moe.npu_moe_token_unpermute(x, partial, probs=torch.ones(3, 2)), "permutation")


@pytest.mark.parametrize("case,args", [
    ("int64 index", (torch.randn(4, 8), torch.arange(4), torch.ones(2, 2))),  # [unperm] "数据类型支持int32"
    ("repeated index", (torch.randn(4, 8), torch.tensor([0, 0, 1, 2], dtype=torch.int32), torch.ones(2, 2))),
    # [unperm] "topK_num要求小于等于512"
    ("topK 513", (torch.randn(513, 8), torch.arange(513, dtype=torch.int32), torch.ones(1, 513))),
])
def test_unpermute_refuses(case, args):
    refused(lambda: moe.npu_moe_token_unpermute(*args))


def test_unpermute_passes_at_512():
    assert moe.npu_moe_token_unpermute(torch.randn(512, 8), torch.arange(512, dtype=torch.int32),
                                       probs=torch.ones(1, 512)).shape == (1, 8)


# --- MC2 dispatch / combine, per device ---------------------------------------------------------------

GLM5 = dict(h=6144, k=8, E=256)


def layout(profile, bs=64, h=GLM5["h"], k=GLM5["k"], ep=16, E=GLM5["E"]):
    return lambda: mc2.check_layout("dispatch", profiles.PROFILES[profile], bs, h, k, ep, E)


@pytest.mark.parametrize("profile,case,call", [
    # [dispatch] BS: "A2: 取值范围为0<BS≤256"; "A3: 取值范围为0<BS≤512"
    ("a2", "BS 257", layout("a2", bs=257)), ("a3", "BS 513", layout("a3", bs=513)), ("a3", "BS 0", layout("a3", bs=0)),
    # [dispatch] ep_world_size: A2 fullmesh "16、32、64、128、256"; A3 "[2, 768]"
    ("a2", "EP 8", layout("a2", ep=8, E=128)), ("a3", "EP 1", layout("a3", ep=1)),
    ("a3", "EP 769", layout("a3", ep=769, E=769)),
    # [dispatch] H: A2 "(0, 7168]，且保证是32的整数倍"; A3 "[1024, 8192]"
    ("a2", "H 7200", layout("a2", h=7200)), ("a2", "H 1000", layout("a2", h=1000)),
    ("a3", "H 1023", layout("a3", h=1023)), ("a3", "H 8200", layout("a3", h=8200)),
    # [dispatch] "K：表示选取topK个专家，取值范围为0<K≤16"
    ("a3", "K 17", layout("a3", k=17)),
    # [dispatch] moe_expert_num "取值范围[1, 1024]", "moe_expert_num%(ep_world_size - shared_expert_rank_num)=0"
    ("a3", "1040 experts", layout("a3", E=1040)), ("a3", "uneven", layout("a3", E=250)),
    # [dispatch] A2: "moe_expert_num/(ep_world_size - shared_expert_rank_num) <= 24"
    ("a2", "25 per rank", layout("a2", E=400)),
])
def test_mc2_layout_refuses(profile, case, call):
    refused(call, WHY[case])


@pytest.mark.parametrize("profile,call", [
    ("a2", layout("a2", bs=256)), ("a2", layout("a2", ep=256, E=1024, h=7168)), ("a2", layout("a2", E=384)),
    ("a3", layout("a3", bs=512)), ("a3", layout("a3", ep=2, h=1024, E=16)), ("a3", layout("a3", ep=768, h=8192, E=768)),
    ("a3", layout("a3", k=16)),
])
def test_mc2_layout_passes(profile, call):
    call()


def test_mc2_expert_ids():
    """[dispatch] expert_ids: "value取值范围为[0, moe_expert_num)，且同一行中的K个value不能重复"."""
    ok = torch.tensor([[1, 2], [3, 0]], dtype=torch.int32)
    mc2.check_ids("dispatch", ok, 2, 4)
    refused(lambda: mc2.check_ids("dispatch", torch.tensor([[1, 1], [3, 0]], dtype=torch.int32), 2, 4), "repeat")
    refused(lambda: mc2.check_ids("dispatch", torch.tensor([[1, 4], [3, 0]], dtype=torch.int32), 2, 4), "lie in")
    refused(lambda: mc2.check_ids("dispatch", ok.long(), 2, 4), "int32")


@pytest.mark.parametrize("name,value", [("shared_expert_num", 0), ("shared_expert_rank_num", 1), ("group_tp", "tp"),
                                        ("tp_world_size", 2), ("expert_shard_type", 1), ("zero_expert_num", 1)])
def test_mc2_a2_unsupported_arguments_keep_their_defaults(name, value):
    """[dispatch] A2: shared_expert_num "暂不支持该参数，使用默认值即可" (default 1); TP, shared-expert ranks, shard
    type and special experts likewise ("使用默认值即可" / "传0即可")."""
    a2 = profiles.PROFILES["a2"]
    refused(lambda: mc2.check_arguments("dispatch", a2, {name: value}), "not supported on a2")
    mc2.check_arguments("dispatch", a2, {"shared_expert_num": 1, "comm_alg": "fullmesh"})


def test_mc2_a3_arguments():
    """[dispatch] A3: shared_expert_num "取值范围[0, 4]，0表示无共享专家"; expert_scales "暂不支持该参数";
    [combine] A3 commAlg "当前版本不支持，传空指针即可"."""
    a3 = profiles.PROFILES["a3"]
    mc2.check_arguments("dispatch", a3, {"shared_expert_num": 0})
    refused(lambda: mc2.check_arguments("dispatch", a3, {"shared_expert_num": 5}), r"\[0, 4\]")
    refused(lambda: mc2.check_arguments("dispatch", a3, {"expert_scales": torch.ones(1, 1)}), "expert_scales")
    refused(lambda: mc2.check_arguments("combine", a3, {"comm_alg": "fullmesh_v1"}, combine=True), "comm_alg")


def test_mc2_global_bs():
    """[dispatch] global_bs: "当每个rank的BS不同时，支持传入max_bs*ep_world_size ... 当每个rank的BS相同时，支持取值0或
    BS*ep_world_size"; "global_bs网络中不同层中也需保持一致"."""
    a3 = profiles.PROFILES["a3"]
    comm = mc2.Comm(None, None)
    assert mc2.check_global_bs("d", comm, 64 * 4, [5, 0, 64, 3], 4, a3) == 64
    assert mc2.check_global_bs("d", comm, 64 * 4, [1, 1, 1, 1], 4, a3) == 64  # same value, next layer
    refused(lambda: mc2.check_global_bs("d", comm, 32 * 4, [1, 1, 1, 1], 4, a3), "same in every layer")
    refused(lambda: mc2.check_global_bs("d", mc2.Comm(None, None), 8 * 4, [9, 1, 1, 1], 4, a3), "max_bs")
    refused(lambda: mc2.check_global_bs("d", mc2.Comm(None, None), 513 * 4, [9, 1, 1, 1], 4, a3), "max_bs")
    refused(lambda: mc2.check_global_bs("d", mc2.Comm(None, None), 0, [9, 1, 1, 1], 4, a3), "same BS")
    assert mc2.check_global_bs("d", mc2.Comm(None, None), 0, [9, 9], 2, a3) == 9


@pytest.mark.parametrize("profile,bs,need_mb", [("a3", 512, 3296), ("a2", 256, 772)])
def test_mc2_hccl_buffsize(monkeypatch, profile, bs, need_mb):
    """[dispatch] HCCL_BUFFSIZE: A2 ">=2*(BS*ep_world_size*min(local_expert_num, K)*H*sizeof(unit16)+2MB)"; A3
    ">= 2 * (local_expert_num * max_bs * ep_world_size * Align512(Align32(2 * H) + 64) + (K + shared_expert_num)
    * max_bs * Align512(2 * H))"; "不配置时默认为200MB". GLM-5 at EP 16: docs/deployment.md section 7."""
    prof = profiles.PROFILES[profile]
    call = lambda: mc2.check_buffsize("dispatch", prof, GLM5["h"], GLM5["k"], 16, bs, GLM5["E"], 0)  # noqa: E731
    monkeypatch.delenv("HCCL_BUFFSIZE", raising=False)
    refused(call, f"HCCL_BUFFSIZE=200 MB is below the {need_mb} MB")
    monkeypatch.setenv("HCCL_BUFFSIZE", str(need_mb - 1))
    refused(call)
    monkeypatch.setenv("HCCL_BUFFSIZE", str(need_mb))
    call()


def test_mc2_communicator_carries_nothing_else(tmp_path):
    """[dispatch] "一个模型中的npu_moe_distribute_dispatch_v2和npu_moe_distribute_combine_v2算子仅支持相同EP通信域，
    且该通信域中不允许有其他算子": any collective on a registered MC2 group is refused, on other groups not."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        ep, mc2_group, transport = (dist.new_group([0], backend="gloo") for _ in range(3))
        with emulator.installed():
            with pytest.raises(ValueError, match="transport group must not be the MC2 group"):
                emulator.register_group("mc2", mc2_group, mc2_group)
            emulator.register_group("mc2", mc2_group, transport)
            assert emulator.comm_name(mc2_group) == "mc2"
            for call in (lambda: dist.all_reduce(torch.zeros(1), group=mc2_group),
                         lambda: dist.all_reduce(torch.zeros(1), dist.ReduceOp.MAX, mc2_group),
                         lambda: dist.barrier(group=mc2_group),
                         lambda: dist.all_to_all_single(torch.zeros(1), torch.zeros(1), group=mc2_group)):
                refused(call, "MC2 communicator")
            dist.all_reduce(torch.zeros(1), group=ep)
            dist.all_reduce(torch.zeros(1), group=transport)
        dist.all_reduce(torch.zeros(1), group=mc2_group)  # the guard lives only while the emulator is installed
    finally:
        dist.destroy_process_group()


def test_emulator_profiles_agree_with_mc2_limits():
    """profiles.py is the emulator's own reading of the MC2 docs; ops/moe/mc2_limits.py the backend's and the
    launcher's. They must agree, so that a slip in either shows here."""
    for name, prof in profiles.PROFILES.items():
        lim = MC2_LIMITS[name]
        assert prof.mc2_max_bs == lim.max_tokens_per_rank
        assert prof.mc2_ep_sizes == lim.ep_world_sizes and prof.mc2_ep_range == lim.ep_world_size_range
        assert lim.hidden_range[1] == prof.mc2_h_max and lim.hidden_multiple == prof.mc2_h_multiple
        assert lim.hidden_range[0] in (prof.mc2_h_min, prof.mc2_h_multiple)  # A2: (0, 7168] in 32s starts at 32
        assert prof.mc2_max_local_experts == lim.max_local_experts
        assert lim.max_top_k == profiles.MC2_MAX_K and lim.max_experts == profiles.MC2_MAX_EXPERTS
