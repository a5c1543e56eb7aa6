"""The console script end to end, as a user runs it from a fresh install."""
from __future__ import annotations

import os
import subprocess
import sys


def _cli(*args, env_extra=None, timeout=300):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "glm5_ascend.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_generate_on_the_builtin_tiny_model(tmp_path):
    r = _cli("generate", "--prompt", "Hello", "--max-tokens", "8", env_extra={"GLM5_CACHE_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    model_dir = tmp_path / "tiny-glm5-v2"
    assert (model_dir / "model.safetensors").is_file()  # created once in the cache dir
    from glm5_ascend import LLM, SamplingParams
    expected = LLM(str(model_dir)).generate("Hello", SamplingParams(max_tokens=8, temperature=0))[0].outputs[0].text
    assert r.stdout == expected + "\n"


def test_make_tiny_writes_a_loadable_checkpoint(tmp_path):
    r = _cli("make-tiny", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert tok.decode(tok.encode("héllo 世界")) == "héllo 世界"
    r = _cli("generate", "--model", str(tmp_path / "m"), "--prompt", "Hi", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr


def test_user_errors_are_one_line(tmp_path):
    r = _cli("generate", "--model", str(tmp_path / "absent"), "--prompt", "x")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("glm5-ascend: error:") and "Traceback" not in r.stderr
    assert "config.json" in r.stderr
    r = _cli("generate", "--prompt", "x", "--max-tokens", "0", env_extra={"GLM5_CACHE_DIR": str(tmp_path)})
    assert r.returncode != 0 and "max_tokens" in r.stderr and "Traceback" not in r.stderr
    r = _cli("nonsense")
    assert r.returncode == 2 and "invalid choice" in r.stderr
