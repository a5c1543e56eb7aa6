"""Random GLM-5 checkpoints written by transformers' own GlmMoeDsaForCausalLM (the oracle)."""
from __future__ import annotations

import torch

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1,
            index_topk=8, index_head_dim=16, index_n_heads=8, initializer_range=0.2, eos_token_id=1,
            rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})

CONFIGS = {
    # a 'shared' indexer layer reusing the previous layer's top-k, plus grouped routing
    "shared_indexer": dict(index_topk_pattern="FFSF", n_group=2, topk_group=1),
    # more groups, two picked per token, every layer with its own indexer
    "grouped_routing": dict(n_group=4, topk_group=2, num_experts_per_tok=3, index_topk=12),
    # two index heads: many keys score exactly 0, so equal scores sit on the top-k boundary and the
    # choice among them must be the one transformers makes
    "tied_index_scores": dict(index_n_heads=2, index_topk=16, n_group=2, topk_group=1),
}


def make_reference(out_dir, name: str, seed: int = 0, tokenizer: bool = True):
    """Build, perturb and save a tiny HF GLM-5; returns the float32 HF model (eval mode)."""
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM
    torch.manual_seed(seed)
    cfg = GlmMoeDsaConfig(**{**BASE, **CONFIGS[name]})
    model = GlmMoeDsaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 1 and "norm" in pname:
                p.add_(torch.randn_like(p) * 0.2)
        for mod in model.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.copy_(torch.randn_like(mod.e_score_correction_bias) * 0.1)
    model.save_pretrained(out_dir)
    if tokenizer:
        from glm5_ascend.model.tiny_tokenizer import write_tiny_tokenizer
        write_tiny_tokenizer(out_dir)
    return model


@torch.no_grad()
def hf_greedy(model, prompt: list[int], steps: int):
    """transformers' own greedy generate (KV cache), never stopping at EOS: tokens and log-softmaxes."""
    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, tokens)]
    return tokens, logprobs
