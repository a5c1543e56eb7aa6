"""ops/moe/mc2_limits.py: the documented MC2 HCCL_BUFFSIZE formulas, GLM-5's figures, the limits."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from glm5_ascend.ops.moe import mc2_limits
from glm5_ascend.ops.moe.mc2_limits import MC2_LIMITS, MiB, hccl_buffsize_bytes, hccl_buffsize_mb, mc2_violations

GLM5 = json.loads((Path(__file__).parent / "golden" / "glm5-model" / "config.json").read_text())
H, K, E = GLM5["hidden_size"], GLM5["num_experts_per_tok"], GLM5["n_routed_experts"]


def test_a2_fullmesh_formula_by_hand():
    # 2 * (BS * ep * min(local, K) * H * sizeof(uint16) + 2MB), local = 16 / 16 = 1 < K = 2
    assert hccl_buffsize_bytes(32, 2, 16, 1, "a2", n_routed_experts=16) == 2 * (1 * 16 * 1 * 32 * 2 + 2 * MiB)
    # without the expert count K bounds min(local, K)
    assert hccl_buffsize_bytes(32, 2, 16, 1, "a2") == 2 * (1 * 16 * 2 * 32 * 2 + 2 * MiB)


def test_a3_fullmesh_v1_formula_by_hand():
    # 2 * (local * BS * ep * Align512(Align32(2H) + 64) + (K + shared) * BS * Align512(2H))
    # H = 1000: Align32(2000) = 2016, + 64 = 2080 -> Align512 = 2560; Align512(2000) = 2048
    assert hccl_buffsize_bytes(1000, 8, 2, 3, "a3", n_routed_experts=4) == 2 * (2 * 3 * 2 * 2560 + 8 * 3 * 2048)
    assert hccl_buffsize_bytes(1000, 8, 2, 3, "a3", n_routed_experts=4, shared_expert_num=1) == \
        2 * (2 * 3 * 2 * 2560 + 9 * 3 * 2048)
    with pytest.raises(ValueError, match="A3 formula needs n_routed_experts"):
        hccl_buffsize_bytes(1000, 8, 2, 3, "a3")


def test_glm5_figures_in_the_deployment_doc():
    # A3: local * ep = E, so the need does not depend on the EP size; 3296 MB at the 512-token maximum.
    assert [hccl_buffsize_mb(H, K, ep, 512, "a3", n_routed_experts=E) for ep in (16, 32)] == [3296, 3296]
    assert [hccl_buffsize_mb(H, K, 16, bs, "a3", n_routed_experts=E) for bs in (16, 64, 128, 256)] == \
        [103, 412, 824, 1648]
    # A2 (EP16 over two nodes): 772 MB at the 256-token maximum
    assert [hccl_buffsize_mb(H, K, 16, bs, "a2", n_routed_experts=E) for bs in (64, 128, 256)] == [196, 388, 772]
    assert hccl_buffsize_mb(H, K, 32, 256, "a2", n_routed_experts=E) == 1540


def test_limits_as_documented():
    assert (MC2_LIMITS["a2"].max_tokens_per_rank, MC2_LIMITS["a3"].max_tokens_per_rank) == (256, 512)
    assert mc2_violations(H, K, 16, 256, "a2", E) == [] and mc2_violations(H, K, 32, 512, "a3", E) == []
    assert mc2_violations(H, K, 16, 257, "a2", E) == ["257 tokens per rank exceeds a2's 256"]
    assert mc2_violations(H, K, 8, 64, "a2", E) == ["EP size 8 is not one of 16, 32, 64, 128, 256",
                                                    "32 experts per rank exceeds 24"]
    assert mc2_violations(7200, 17, 16, 64, "a2", E) == ["hidden_size 7200 is outside [32, 7168], a multiple of 32",
                                                         "top-k 17 is outside (0, 16]"]
    assert mc2_violations(512, K, 1, 64, "a3", E) == ["EP size 1 is outside [2, 768]",
                                                      "hidden_size 512 is outside [1024, 8192]"]
    assert mc2_violations(H, K, 24, 64, "a3", E) == ["256 experts do not split evenly over EP 24 (at most 1024)"]
    with pytest.raises(ValueError, match="documented for a2 and a3, not 'cuda'"):
        hccl_buffsize_mb(H, K, 8, 1, "cuda")


def test_pure_python_no_torch_npu():
    tree = ast.parse(Path(mc2_limits.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "math", "dataclasses"}


def test_the_deployment_doc_table_matches_the_formula():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "deployment.md").read_text()
    rows = re.findall(r"^\| (\d+)(?: \(A3 maximum\))? \| (\d+) MB \| (?:(\d+) MB|-) \|$", doc, re.M)
    assert [r[0] for r in rows] == ["16", "64", "128", "256", "512"]
    for bs, a3, a2 in rows:
        assert int(a3) == hccl_buffsize_mb(H, K, 16, int(bs), "a3", n_routed_experts=E)
        if a2:
            assert int(a2) == hccl_buffsize_mb(H, K, 16, int(bs), "a2", n_routed_experts=E)
