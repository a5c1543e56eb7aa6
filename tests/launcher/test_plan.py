"""`glm5-ascend plan` against the real GLM-5 config: counts, per-rank bytes, verdicts, CLI.

Every expected figure is computed here independently of the planner: parameter counts and per-rank
weight bytes from the engine's own model built on the meta device (its parameters, as the engine
shards and stores them), KV bytes from the config's dimensions.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glm5_ascend.config import ModelConfig
from glm5_ascend.distributed import ParallelState
from glm5_ascend.launcher.plan import DEVICES, Layout, active_params, count_params, plan, smallest_fitting

REF = Path(__file__).resolve().parents[1] / "data" / "glm5-config.json"  # the published GLM-5 config.json
GiB = 1 << 30
A3 = DEVICES["atlas-a3"]


@pytest.fixture(scope="module")
def glm5():
    return ModelConfig.from_dict(json.loads(REF.read_text()))


def _meta_model(cfg, devices=1, tp=1, ep=False, dtype=torch.bfloat16):
    from glm5_ascend.model.glm5 import GlmMoeDsaForCausalLM
    ps = ParallelState(tp_rank=0, tp_size=tp, ep_rank=0, ep_size=devices if ep else 1, dp_size=devices // tp)
    with torch.device("meta"):
        return GlmMoeDsaForCausalLM(cfg, ps, dtype)


def _bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_parameter_counts_match_the_published_totals_and_the_model(glm5):
    from glm5_ascend.model.glm5 import Experts
    model = _meta_model(glm5)
    total = sum(p.numel() for p in model.parameters())
    mtp = sum(p.numel() for p in model.mtp.parameters())
    routed = sum(p.numel() for m in model.model.layers[:glm5.num_hidden_layers].modules() if isinstance(m, Experts)
                 for p in m.parameters())
    per_token_routed = routed // glm5.n_routed_experts * glm5.num_experts_per_tok
    active = total - mtp - routed + per_token_routed
    assert abs((total - mtp) / 744e9 - 1) < 0.01  # "about 744B parameters"
    assert abs(total / 1e9 - 753.9) < 0.1  # "753.9B with the MTP layer"
    embedding = glm5.vocab_size * glm5.hidden_size
    assert 39.5e9 < active - 2 * embedding < 40.5e9  # "about 40B active" (embedding and lm_head apart)
    p = count_params(glm5)
    assert p.total == total and active_params(glm5, p) == active


@pytest.mark.parametrize("devices,tp,ep", [(16, 16, True), (16, 16, False), (32, 16, True), (8, 8, False),
                                           (16, 4, True)])
def test_weight_bytes_per_rank_equal_the_engines_shard(glm5, devices, tp, ep):
    r = plan(glm5, Layout(devices, tp, ep), A3, "bf16")
    assert r["weight_bytes_per_rank"] == _bytes(_meta_model(glm5, devices, tp, ep))


@pytest.mark.parametrize("devices,tp,ep", [(16, 16, True), (8, 8, False)])
def test_w8a8_bytes_per_rank_equal_the_engines_w8a8_model(glm5, devices, tp, ep):
    """As a checkpoint converted with the default --keep describes it: those linears FLOAT, the rest int8."""
    import dataclasses

    from glm5_ascend.model.layers import ReplicatedLinear
    from glm5_ascend.model.quant import DEFAULT_KEEP, keep_high_precision
    float_model = _meta_model(glm5, devices, tp, ep)
    kept = sorted(n for n, m in float_model.named_modules()
                  if isinstance(m, ReplicatedLinear) and keep_high_precision(n, DEFAULT_KEEP))
    qcfg = dataclasses.replace(glm5, quantization_config={"quant_method": "msmodelslim",
                                                          "model_quant_type": "W8A8_DYNAMIC", "float_modules": kept})
    model = _meta_model(qcfg, devices, tp, ep)
    assert any(p.dtype == torch.int8 for p in model.parameters())
    assert plan(glm5, Layout(devices, tp, ep), A3, "w8a8")["weight_bytes_per_rank"] == _bytes(model)


def _kv_tokens(cfg, weight_bytes, margins, util=0.9, hbm_gib=64):
    per_token = cfg.num_hidden_layers * (512 + 64 + 128) * 2  # latent + rope key + index key, bf16
    assert per_token == 78 * 704 * 2
    return int(hbm_gib * GiB * util - weight_bytes - sum(margins.values())) // per_token // 128 * 128


def test_a3_verdicts(glm5):
    bf16_one = plan(glm5, Layout(16, 16, False), A3, "bf16")
    assert not bf16_one["fits"] and bf16_one["weight_bytes_per_rank"] > 64 * GiB
    w8a8_one = plan(glm5, Layout(16, 16, True), A3, "w8a8", max_model_len=32768)
    assert w8a8_one["fits"] and w8a8_one["weight_bytes_per_rank"] < 0.9 * 64 * GiB
    assert w8a8_one["kv_tokens"] == _kv_tokens(glm5, w8a8_one["weight_bytes_per_rank"], w8a8_one["margin_bytes"])
    assert w8a8_one["kv_tokens"] >= 32768
    bf16_two = plan(glm5, Layout(32, 16, True), A3, "bf16", max_model_len=32768)
    assert bf16_two["fits"] and bf16_two["layout"]["dp"] == 2
    assert bf16_two["kv_tokens"] == _kv_tokens(glm5, bf16_two["weight_bytes_per_rank"], bf16_two["margin_bytes"])
    # The smallest layout for BF16 is two nodes; W4A8 needs about a quarter of BF16's expert bytes.
    best = smallest_fitting(glm5, Layout(16, 16, False), A3, "bf16", per_node=16)
    assert best["devices"] == 32 and best["expert_parallel"]
    w4 = plan(glm5, Layout(8, 8, True), DEVICES["atlas-a2"], "w4a8")
    assert w4["fits"] and w4["weight_bytes_by_class"]["routed_experts"] < plan(
        glm5, Layout(8, 8, True), DEVICES["atlas-a2"], "w8a8")["weight_bytes_by_class"]["routed_experts"] * 0.51
    assert 0 < w8a8_one["tpot_ms"] and w8a8_one["decode_tok_s"] > 0


def test_layout_errors(glm5):
    with pytest.raises(ValueError, match="multiple of --tensor-parallel-size"):
        plan(glm5, Layout(12, 8, False), A3)
    with pytest.raises(ValueError, match="n_routed_experts=256 is not divisible by --devices 24"):
        plan(glm5, Layout(24, 8, True), A3)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "glm5_ascend.cli", "plan", "--model", str(REF), *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_json_and_text(glm5):
    r = _cli("--device", "atlas-a3", "--nodes", "1", "-tp", "16", "--quantization", "w8a8",
             "--enable-expert-parallel", "--max-model-len", "32768", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["fits"] and out["total_params"] == count_params(glm5).total and out["kv_tokens"] > 0
    assert {"active_params", "weight_bytes_per_rank", "kv_tokens"} <= set(out)
    assert out["layout"] == {"devices": 16, "tp": 16, "dp": 1, "expert_parallel": True}
    small = _cli("--device", "atlas-a3", "--nodes", "1", "-tp", "16")
    assert small.returncode == 1 and "does not fit; the smallest that fits: 2 node(s), 32 devices" in small.stdout
    big = _cli("--devices", "32", "-dp", "2", "--device", "atlas-a3", "--enable-expert-parallel", "--max-model-len",
               "8192", "--batch", "2", "--context", "4096")
    assert big.returncode == 0 and "verdict: fits" in big.stdout and "TP 16 x DP 2" in big.stdout
    bad = _cli("--devices", "12", "-tp", "8")
    assert bad.returncode == 1 and bad.stderr.strip().startswith("glm5-ascend: error:")
    assert "Traceback" not in bad.stderr
    clash = _cli("--devices", "8", "--nodes", "2", "--device", "atlas-a3")
    assert clash.returncode == 1 and "disagrees with --nodes x --devices-per-node = 32" in clash.stderr


def test_defaults_work_together_on_the_builtin_model():
    """`glm5-ascend plan` with no argument: the tiny model on one device (its 4 heads take no TP 8)."""
    r = subprocess.run([sys.executable, "-m", "glm5_ascend.cli", "plan"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "layout: 1 x Ascend 910B (Atlas 800 A2) (64 GiB, 1.6 TB/s), TP 1 x DP 1" in r.stdout
    assert r.stdout.strip().endswith("verdict: fits")
