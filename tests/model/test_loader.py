"""Checkpoint loading: shards, MTP layer, and clear errors for bad checkpoints and configs."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from glm5_ascend import LLM
from glm5_ascend.config import ModelConfig
from glm5_ascend.model.loader import CheckpointError
from glm5_ascend.model.tiny import make_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _greedy(path, **kw):
    from glm5_ascend import SamplingParams
    llm = LLM(str(path), device="cpu", block_size=16, **kw)
    out = llm.generate([{"prompt_token_ids": list(range(60))}], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    return llm, out[0].outputs[0].token_ids


def test_make_tiny_is_deterministic_and_exercises_the_architecture(tiny, tmp_path):
    again = make_tiny(tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()
    cfg = ModelConfig.from_pretrained(tiny)
    assert sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)) >= 2
    assert cfg.n_group > 1 and "shared" in cfg.indexer_types and cfg.num_nextn_predict_layers == 1
    assert cfg.index_topk < 64
    names = load_file(str(tiny / "model.safetensors")).keys()
    assert any(n.startswith(f"model.layers.{cfg.num_hidden_layers}.eh_proj") for n in names)


def test_mtp_layer_is_loaded_and_kept(tiny):
    llm, _ = _greedy(tiny)
    model = llm.llm_engine.runner.model
    ref = load_file(str(tiny / "model.safetensors"))
    n = model.cfg.num_hidden_layers
    assert model.mtp is not None
    assert torch.equal(model.mtp.eh_proj.weight, ref[f"model.layers.{n}.eh_proj.weight"])
    assert torch.equal(model.mtp.mlp.experts.w2_weight[3], ref[f"model.layers.{n}.mlp.experts.3.down_proj.weight"])


def test_expert_weights_end_in_the_layout_the_grouped_mlp_backend_prepares(tiny, monkeypatch):
    """load_weights hands each layer's experts to ops.prepare_expert_weights and the model runs on what
    comes back: here the cuda backend's tile-packed form (16 x 32 tiles), which the reference reads too."""
    from glm5_ascend import ops
    from glm5_ascend.model.glm5 import Experts

    def pack(w13, w2):
        def tiles(w):
            E, rows, K = w.shape
            return w.reshape(E, rows // 16, 16, K // 32, 32).permute(0, 1, 3, 2, 4).contiguous()
        return tiles(w13), tiles(w2)

    _, want = _greedy(tiny)
    monkeypatch.setattr(ops, "prepare_expert_weights", pack)
    llm, got = _greedy(tiny)
    experts = [m for m in llm.llm_engine.runner.model.modules() if isinstance(m, Experts)]
    assert experts and all(m.w13_weight.dim() == 5 and m.w2_weight.dim() == 5 for m in experts)
    assert got == want


def test_sharded_checkpoint_equals_single_file(tiny, tmp_path):
    shard_dir = _copy(tiny, tmp_path / "sharded")
    tensors = load_file(str(shard_dir / "model.safetensors"))
    (shard_dir / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, part in halves.items():
        save_file({k: tensors[k] for k in part}, str(shard_dir / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert _greedy(shard_dir)[1] == _greedy(tiny)[1]


def _rewrite(path, mutate):
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    mutate(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def test_missing_tensor_is_named(tiny, tmp_path):
    bad = _copy(tiny, tmp_path / "missing")
    _rewrite(bad, lambda t: t.pop("model.layers.1.self_attn.indexer.wk.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.indexer\.wk\.weight"):
        LLM(str(bad), device="cpu")


def test_extra_and_misshaped_tensors_are_named(tiny, tmp_path):
    extra = _copy(tiny, tmp_path / "extra")
    _rewrite(extra, lambda t: t.__setitem__("model.layers.0.bogus.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.bogus\.weight"):
        LLM(str(extra), device="cpu")
    shaped = _copy(tiny, tmp_path / "shaped")
    _rewrite(shaped, lambda t: t.__setitem__("model.norm.weight", torch.ones(7)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.norm\.weight: shape \(7,\)"):
        LLM(str(shaped), device="cpu")


def test_corrupt_and_missing_files_are_named(tiny, tmp_path):
    trunc = _copy(tiny, tmp_path / "trunc")
    f = trunc / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"trunc/model\.safetensors"):
        LLM(str(trunc), device="cpu")
    garbage = _copy(tiny, tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match=r"garbage/model\.safetensors: not a readable safetensors file"):
        LLM(str(garbage), device="cpu")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LLM(str(tmp_path / "nowhere"), device="cpu")
    sharded = _copy(tiny, tmp_path / "lost-shard")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"gone\.safetensors: listed in model\.safetensors\.index\.json but missing"):
        LLM(str(sharded), device="cpu")


@pytest.mark.parametrize("change, msg", [
    ({"n_group": 3}, "not divisible by n_group"),
    ({"topk_group": 5}, "topk_group"),
    ({"index_topk_pattern": "SFFF"}, r"indexer_types\[0\] must be 'full'"),
    ({"index_topk_pattern": "FFX"}, "index_topk_pattern"),
    ({"kv_lora_rank": 0}, "kv_lora_rank"),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "GLM-5 only"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quant_method='gptq' is not supported"),
    ({"quantization_config": {"quant_method": "fp8"}}, "weight_block_size=None must be two positive integers"),
])
def test_bad_config_is_one_clear_error(tiny, change, msg):
    raw = json.loads((tiny / "config.json").read_text())
    raw.update(change)
    with pytest.raises(ValueError, match=msg):
        ModelConfig.from_dict(raw)


def test_missing_config_field_is_named(tiny):
    raw = json.loads((tiny / "config.json").read_text())
    del raw["index_head_dim"]
    with pytest.raises(ValueError, match="missing required field.*index_head_dim"):
        ModelConfig.from_dict(raw)


def test_published_glm5_config_parses():
    from pathlib import Path
    ref = Path(__file__).resolve().parents[1] / "data" / "glm5-config.json"  # the published config.json
    cfg = ModelConfig.from_dict(json.loads(ref.read_text()))
    assert cfg.mlp_layer_types[:4] == ("dense", "dense", "dense", "sparse")
    assert set(cfg.indexer_types) == {"full"} and cfg.mtp_layer_index == 78 and cfg.qk_head_dim == 256


def test_moe_layer_freq_follows_transformers(tiny):
    """transformers' GlmMoeDsaConfig ignores moe_layer_freq: first_k_dense_replace dense layers, then MoE."""
    from transformers import GlmMoeDsaConfig
    raw = json.loads((tiny / "config.json").read_text())
    raw.update(moe_layer_freq=2, first_k_dense_replace=1, num_hidden_layers=5, index_topk_pattern="FFSFF")
    ours = ModelConfig.from_dict(raw).mlp_layer_types
    hf_raw = {k: v for k, v in raw.items() if k not in ("architectures", "model_type")}
    assert list(ours) == GlmMoeDsaConfig(**hf_raw).mlp_layer_types == ["dense"] + ["sparse"] * 4


def test_checkpoint_without_tokenizer_serves_token_ids(tmp_path):
    """transformers' save_pretrained writes no tokenizer: token ids in and out still work, text is refused."""
    from tests.model.hf_reference import make_reference
    from glm5_ascend import SamplingParams
    hf = make_reference(tmp_path, "shared_indexer", tokenizer=False)
    llm = LLM(str(tmp_path), dtype="float32", device="cpu", block_size=16)
    out = llm.generate([{"prompt_token_ids": list(range(2, 30))}], SamplingParams(temperature=0, max_tokens=4))[0]
    ref = hf.generate(torch.tensor([list(range(2, 30))]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.outputs[0].token_ids == ref[0, 28:].tolist() and out.outputs[0].text == ""
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate(["text needs a tokenizer"])
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        llm.generate([{"prompt_token_ids": [3, 4]}], SamplingParams(stop=["x"]))
    skip = LLM(str(tmp_path), dtype="float32", device="cpu", skip_tokenizer_init=True)
    assert skip.get_tokenizer() is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the cuda backend packs experts)")
def test_cuda_backend_packs_bf16_experts_and_decodes_as_with_plain_weights(tiny, monkeypatch):
    from glm5_ascend import SamplingParams, ops
    from glm5_ascend.model.glm5 import Experts

    def greedy():
        llm = LLM(str(tiny), dtype="bfloat16", device="cuda", block_size=16)
        experts = [m for m in llm.llm_engine.runner.model.modules() if isinstance(m, Experts)]
        out = llm.generate([{"prompt_token_ids": list(range(60))}],
                           SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        return [(m.w13_weight.dim(), m.w2_weight.dim()) for m in experts], out[0].outputs[0].token_ids

    dims, packed = greedy()
    assert dims and all(d == (5, 5) for d in dims)
    monkeypatch.setattr(ops, "prepare_expert_weights", lambda w13, w2: (w13, w2))
    dims, plain = greedy()
    assert all(d == (3, 3) for d in dims)
    assert packed == plain
