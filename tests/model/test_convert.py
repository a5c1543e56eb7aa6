"""`glm5-ascend convert`: streaming peak memory, resume after an interruption, formats written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from glm5_ascend.model import convert as convert_mod
from glm5_ascend.model.convert import STATE_FILE, convert
from glm5_ascend.model.tiny import make_tiny, tiny_config

MiB = 1 << 20
MARGIN = 48 * MiB  # the interpreter's own allocations, plus a few row slices of 8 MiB (convert._CHUNK_BYTES)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def _big_checkpoint(out: Path) -> int:
    """Four source shards, ~137 MB of bf16; the largest tensor 64 MiB. -> largest tensor bytes."""
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(tiny_config(1024)))
    gen = torch.Generator().manual_seed(0)
    shapes = [(4096, 8192), (8192, 2048), (2048, 4096), (1024, 6144), (6144, 1024), (512, 512), (8192,)]
    weight_map = {}
    for s in range(4):
        tensors = {}
        for i, shape in enumerate(shapes[s::4] + [shapes[-1]] * (s == 3)):
            name = (f"model.layers.{s}.mlp.experts.{i}.gate_proj.weight" if len(shape) == 2
                    else f"model.layers.{s}.x.bias")
            tensors[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            weight_map[name] = f"shard-{s}.safetensors"
        save_file(tensors, str(out / f"shard-{s}.safetensors"))
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return 4096 * 8192 * 2


def _measure(src: str, dst: str, to: str) -> dict:
    """In this (fresh) process: peak RssAnon growth while converting."""
    import threading
    import time

    def anon() -> int:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no RssAnon")
    torch.set_num_threads(1)
    base, peak, done = anon(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.001)
    thread = threading.Thread(target=sample)
    thread.start()
    convert(src, dst, to, max_shard_size=20 * 10**6, progress=False)
    done.set()
    thread.join()
    return {"peak": max(peak[0], anon()) - base}


@pytest.mark.parametrize("to", ["w8a8", "fp8"])
def test_peak_memory_is_about_one_tensor(tmp_path, to):
    largest = _big_checkpoint(tmp_path / "src")
    out = subprocess.run([sys.executable, __file__, str(tmp_path / "src"), str(tmp_path / "dst"), to],
                         capture_output=True, text=True, timeout=600,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    peak = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    print(f"convert --to {to}: peak RssAnon growth {peak / MiB:.1f} MiB, largest tensor {largest / MiB:.0f} MiB")
    assert peak <= 2 * largest + MARGIN, peak / MiB
    shards = sorted((tmp_path / "dst").glob("model-*.safetensors"))
    assert len(shards) >= 3  # several output shards, each <= 20 MB (or one tensor)
    index = json.loads((tmp_path / "dst" / "model.safetensors.index.json").read_text())
    name = "model.layers.0.mlp.experts.0.gate_proj.weight"
    got = load_file(str(tmp_path / "dst" / index["weight_map"][name]))
    src = load_file(str(tmp_path / "src" / "shard-0.safetensors"))[name].float()
    if to == "w8a8":
        scale = load_file(str(tmp_path / "dst" / index["weight_map"][name[:-len("weight")] + "weight_scale"]))
        deq = got[name].float() * scale[name[:-len("weight")] + "weight_scale"]
        assert ((deq - src).abs() <= src.abs().amax(1, keepdim=True) / 127 / 2 + 1e-7).all()
    else:
        assert got[name].dtype == torch.float8_e4m3fn


def _files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def test_interrupted_conversion_resumes_to_identical_bytes(tiny, tmp_path, monkeypatch):
    whole = convert(tiny, tmp_path / "whole", "w8a8", max_shard_size=200_000, progress=False)
    real_emit, calls = convert_mod._emit, [0]

    def interrupted(unit, source):
        calls[0] += 1
        if calls[0] == 40:  # mid-way through a shard, after earlier shards finished
            raise KeyboardInterrupt
        yield from real_emit(unit, source)
    monkeypatch.setattr(convert_mod, "_emit", interrupted)
    dst = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        convert(tiny, dst, "w8a8", max_shard_size=200_000, progress=False)
    names = {f.name for f in dst.iterdir()}
    # Not a checkpoint yet: no config, no index, one shard half-written under .partial.
    assert "config.json" not in names and "model.safetensors.index.json" not in names
    assert STATE_FILE in names and any(n.endswith(".safetensors.partial") for n in names)
    finished = json.loads((dst / STATE_FILE).read_text())["done"]
    assert finished and all((dst / n).is_file() for n in finished)
    before = {n: (dst / n).stat().st_mtime_ns for n in finished}
    with pytest.raises(ValueError, match="unfinished conversion of another source or with other arguments"):
        convert(tiny, dst, "bf16", max_shard_size=200_000, progress=False)
    monkeypatch.setattr(convert_mod, "_emit", real_emit)
    convert(tiny, dst, "w8a8", max_shard_size=200_000, progress=False)
    assert {n: (dst / n).stat().st_mtime_ns for n in finished} == before  # finished shards were not rewritten
    assert _files(dst) == _files(whole)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        convert(tiny, dst, "w8a8", max_shard_size=200_000, progress=False)


def test_fp8_to_bf16_and_w8a8_layout(tiny, tmp_path):
    fp8 = convert(tiny, tmp_path / "fp8", "fp8", progress=False)
    bf16 = convert(fp8, tmp_path / "bf16", "bf16", progress=False)
    cfg = json.loads((bf16 / "config.json").read_text())
    assert "quantization_config" not in cfg
    q, out = {}, {}
    for f in fp8.glob("*.safetensors"):
        q.update(load_file(str(f)))
    for f in bf16.glob("*.safetensors"):
        out.update(load_file(str(f)))
    name = "model.layers.1.mlp.experts.0.down_proj.weight"
    assert out[name].dtype == torch.bfloat16 and not any(n.endswith("_scale_inv") for n in out)
    want = (q[name].float() * q[name + "_scale_inv"].repeat_interleave(128, 0).repeat_interleave(128, 1)
            [:q[name].shape[0], :q[name].shape[1]]).to(torch.bfloat16)
    assert torch.equal(out[name], want)
    assert torch.equal(out["model.norm.weight"], q["model.norm.weight"])  # unquantized: unchanged
    w8 = convert(tiny, tmp_path / "w8a8", "w8a8", progress=False)
    desc = json.loads((w8 / "quant_model_description.json").read_text())
    assert desc["model_quant_type"] == "W8A8_DYNAMIC"
    assert desc["model.layers.1.mlp.experts.0.down_proj.weight"] == "W8A8_DYNAMIC"
    assert desc["model.layers.1.mlp.experts.0.down_proj.weight_scale"] == "W8A8_DYNAMIC"
    assert desc["model.layers.1.mlp.gate.weight"] == "FLOAT" and desc["lm_head.weight"] == "FLOAT"
    assert desc["model.layers.0.self_attn.kv_b_proj.weight"] == "FLOAT"
    w = {}
    for f in w8.glob("*.safetensors"):
        w.update(load_file(str(f)))
    assert w["model.layers.0.self_attn.o_proj.weight"].dtype == torch.int8
    assert w["model.layers.0.self_attn.o_proj.weight_scale"].shape == (128, 1)
    assert not w["model.layers.0.self_attn.o_proj.weight_offset"].any()
    assert set(desc) - {"model_quant_type"} == set(w)


if __name__ == "__main__":
    print(json.dumps(_measure(*sys.argv[1:4])))
