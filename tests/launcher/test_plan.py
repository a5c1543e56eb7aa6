"""`glm5-ascend plan`: parameter accounting against GLM-5's published totals, and layout verdicts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from glm5_ascend.config import ModelConfig
from glm5_ascend.launcher.plan import active_params, count_params, plan

REF = Path(__file__).resolve().parents[3] / "shared" / "reference" / "glm5-config.json"


@pytest.fixture(scope="module")
def glm5():
    if not REF.is_file():
        pytest.skip("shared/reference/glm5-config.json is not beside this checkout")
    return ModelConfig.from_dict(json.loads(REF.read_text()))


def test_parameter_counts_match_the_published_totals(glm5):
    p = count_params(glm5)
    assert abs((p.total - p.mtp) / 1e9 - 744) < 1  # "about 744B parameters"
    assert abs(p.total / 1e9 - 753.9) < 0.1  # "753.9B with the MTP layer"
    embedding = glm5.vocab_size * glm5.hidden_size
    assert 39.5e9 < active_params(glm5, p) - 2 * embedding < 40.5e9  # "about 40B active"


def test_layout_verdicts(glm5):
    one_node = plan(glm5, 8, 8, 64, 1.6, 2, 0.9, 8192, 32, 8192)
    four_nodes = plan(glm5, 32, 8, 64, 1.6, 2, 0.9, 8192, 32, 8192)
    assert not one_node["fits"] and one_node["weights_gib"] > 64  # BF16 GLM-5 needs more than one A2 node
    assert four_nodes["fits"] and four_nodes["kv_tokens"] > 8192 and four_nodes["dp"] == 4
    assert four_nodes["tpot_ms"] > 0 and four_nodes["decode_tok_s"] > 0
    with pytest.raises(ValueError, match="multiple of --tensor-parallel-size"):
        plan(glm5, 12, 8, 64, 1.6, 2, 0.9, 8192, 32, 8192)
    with pytest.raises(ValueError, match="n_routed_experts=256 is not divisible by --devices 24"):
        plan(glm5, 24, 8, 64, 1.6, 2, 0.9, 8192, 32, 8192)


def test_cli_prints_a_verdict_and_exit_code(glm5, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "glm5_ascend.cli", "plan", "--model", str(REF), *args],
                              capture_output=True, text=True, timeout=120)
    small = run("--devices", "8", "-tp", "8")
    assert small.returncode == 1 and "does not fit" in small.stdout
    big = run("--devices", "32", "-tp", "8", "--max-model-len", "8192", "--batch", "2", "--context", "4096")
    assert big.returncode == 0 and "verdict: fits" in big.stdout and "753.9B" in big.stdout
    bad = run("--devices", "12", "-tp", "8")
    assert bad.returncode == 1 and bad.stderr.strip().startswith("glm5-ascend: error:") and "Traceback" not in bad.stderr


def test_defaults_work_together_on_the_builtin_model():
    """`glm5-ascend plan` with no argument: the tiny model on one device (its 4 heads take no TP 8)."""
    r = subprocess.run([sys.executable, "-m", "glm5_ascend.cli", "plan"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "layout: 1 x Ascend 910B (Atlas 800 A2) (64 GiB, 1.6 TB/s), TP 1 x DP 1" in r.stdout
    assert r.stdout.strip().endswith("verdict: fits")
