"""`glm5-ascend bench latency` / `bench throughput`, run as users run them, and the arithmetic behind
their bounds (launcher/sizing.py): on the CPU with the tiny model; the GPU figures live in
docs/benchmarks.md."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from glm5_ascend.config import ModelConfig
from glm5_ascend.launcher.plan import decode_bound
from glm5_ascend.launcher.sizing import (Layout, active_params, count_params, prefill_flops, rank_weight_bytes,
                                         step_weight_bytes)

GLM5 = Path(__file__).parents[1] / "data" / "glm5-config.json"
FOUR_LAYERS = {"num_hidden_layers": 4, "first_k_dense_replace": 1, "num_nextn_predict_layers": 0}


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glm5_ascend.cli", "bench", *args], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def glm5_4layers(tmp_path_factory) -> ModelConfig:
    d = tmp_path_factory.mktemp("glm5")
    (d / "config.json").write_text(GLM5.read_text())
    return ModelConfig.from_pretrained(d, FOUR_LAYERS)


def test_decode_bound_matches_the_issue_table(glm5_4layers):
    """GLM-5 width, 4 layers, bf16, one device, 4.25 TB/s: 1.36 / 6.3 / 13.0 ms (the issue's table)."""
    one = Layout(1, 1, False)
    got = [decode_bound(glm5_4layers, one, {"hbm_tbps": 4.25}, "bf16", 0, b, ctx)["tpot_ms"]
           for b, ctx in ((1, 2048), (16, 1024), (64, 8192))]
    assert got == pytest.approx([1.36, 6.34, 13.01], abs=0.01)


def test_step_weights_skip_the_embedding_table_and_untouched_experts(glm5_4layers):
    c, one = glm5_4layers, Layout(1, 1, False)
    table = c.vocab_size * c.hidden_size * 2
    many = step_weight_bytes(c, one, "bf16", 100_000)  # every expert touched
    total = rank_weight_bytes(c, one, "bf16", mtp=False)["total"]
    assert many == pytest.approx(total - table)
    assert step_weight_bytes(c, one, "bf16", 1) < many / 5  # one token reads 8 of 256 experts per layer


@pytest.mark.parametrize("start,n", [(0, 1), (0, 50), (0, 3000), (100, 2000), (2047, 3), (5000, 7)])
def test_prefill_flops_closed_form_equals_the_per_token_sum(glm5_4layers, start, n):
    c = glm5_4layers
    linear = 2 * (active_params(c, count_params(c)) - 2 * c.vocab_size * c.hidden_size)
    per_token = [linear + 2 * c.index_n_heads * c.index_head_dim * (p + 1) * c.num_hidden_layers
                 + 2 * c.num_attention_heads * min(c.index_topk, p + 1) * (2 * c.kv_lora_rank + c.qk_rope_head_dim)
                 * c.num_hidden_layers for p in range(start, start + n)]
    assert prefill_flops(c, start, n) == pytest.approx(sum(per_token), rel=1e-12)


def test_latency_prints_vllm_figures_and_bounds(tmp_path):
    out = tmp_path / "lat.json"
    proc = bench("latency", "--batch-size", "3", "--input-len", "20", "--output-len", "5", "--num-iters-warmup",
                 "1", "--num-iters", "2", "--output-json", str(out), "--max-num-seqs", "4")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "Avg latency: " in text and "99% percentile latency: " in text
    assert "measured: copy " in text and "matmul 1024^3" in text
    r = json.loads(out.read_text())
    assert len(r["latencies"]) == 2 and r["avg_latency"] == pytest.approx(np.mean(r["latencies"]))
    assert set(r["percentiles"]) == {"10", "25", "50", "75", "90", "99"}
    # every timed iteration: one prefill step (60 tokens fit one step), then 4 steps of 3 decodes
    assert r["decode"]["steps"] == 2 * 4
    assert r["decode"]["mean_context"] == pytest.approx(20 + 2.5)
    assert 0 < r["decode"]["bound_seconds"] < r["decode"]["median_step_seconds"]
    assert r["prefill"]["flops"] > 0 and "Prefill: 3 x 20 tokens" in text and "Decode: batch 3" in text


def test_latency_on_dummy_weights_with_overrides(tmp_path):
    out = tmp_path / "lat.json"
    proc = bench("latency", "--batch-size", "2", "--input-len", "8", "--output-len", "3", "--num-iters-warmup",
                 "0", "--num-iters", "1", "--load-format", "dummy", "--hf-overrides", '{"num_hidden_layers": 2}',
                 "--output-json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "2 layers" in proc.stdout and "dummy (random) weights" in proc.stdout


def test_throughput_counts_every_token(tmp_path):
    out = tmp_path / "tp.json"
    proc = bench("throughput", "--num-prompts", "12", "--input-len", "16", "--output-len", "6",
                 "--random-range-ratio", "0.5", "--max-num-seqs", "5", "--output-json", str(out))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["num_requests"] == 12 and "Throughput: " in proc.stdout and "requests/s" in proc.stdout
    prompt = int(proc.stdout.split("Total num prompt tokens:")[1].split()[0])
    output = int(proc.stdout.split("Total num output tokens:")[1].split()[0])
    assert 12 * 8 <= prompt <= 12 * 24 and 12 * 3 <= output <= 12 * 9
    assert r["total_num_tokens"] == prompt + output
    assert r["decode"]["mean_batch"] <= 5  # --max-num-seqs bounds every step's batch
    assert 0 < r["roofline_floor_seconds"] < r["step_seconds"] <= r["elapsed_time"]


@pytest.mark.parametrize("args,message", [
    (["latency", "--batch-size", "0"], "--batch-size 0 must be at least 1"),
    (["latency", "--input-len", "30", "--output-len", "10", "--max-model-len", "32"],
     "--input-len 30 + --output-len 10 exceeds --max-model-len 32"),
    (["throughput", "--dataset-name", "sharegpt"], "--dataset-name sharegpt needs --dataset-path"),
    (["throughput", "--random-range-ratio", "1.5", "--num-prompts", "1"], "--random-range-ratio 1.5 must be in"),
    (["latency", "--hf-overrides", "[1]"], "is not a JSON object"),
])
def test_bad_flags_are_one_line_errors(args, message):
    proc = bench(*args, "--num-iters-warmup", "0", "--num-iters", "1") if args[0] == "latency" else bench(*args)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_throughput_on_sharegpt_takes_each_answers_length_unless_fixed(tmp_path):
    data = tmp_path / "sharegpt.json"
    turns = [{"from": "human", "value": "Tell me a long story about a cat and a dog please now"},
             {"from": "gpt", "value": "Once upon a time there was a cat who lived with a dog in a small house."}]
    data.write_text(json.dumps([{"conversations": turns}] * 3))
    outputs = []
    for extra in ([], ["--output-len", "5"]):
        proc = bench("throughput", "--dataset-name", "sharegpt", "--dataset-path", str(data), "--num-prompts", "3",
                     *extra)
        assert proc.returncode == 0, proc.stderr
        outputs.append(int(proc.stdout.split("Total num output tokens:")[1].split()[0]))
    assert outputs[1] == 15 and outputs[0] > 15 and outputs[0] % 3 == 0  # every answer's own length
