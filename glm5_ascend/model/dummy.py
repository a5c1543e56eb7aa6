"""`--load-format dummy`: random weights at the model's real size, no checkpoint files (vLLM's flag).

For benchmarks: with `--hf-overrides` (fewer layers) anyone can time the GLM-5-width model without
downloading its 1.5 TB. The values are drawn like the built-in tiny model's (norms near one, the
rest small), on the device, so the numbers stay finite through every layer. A W8A8 model
(`--hf-overrides '{"quantization_config": {"quant_method": "msmodelslim"}}'`) gets random int8
weights with per-row scales giving the same spread.
"""
from __future__ import annotations

import torch

from glm5_ascend.model.glm5 import Experts, GlmMoeDsaForCausalLM

_STD = 0.02  # GLM-5's initializer_range


@torch.no_grad()
def init_dummy_weights(model: GlmMoeDsaForCausalLM, seed: int) -> None:
    model.drop_mtp()  # speculative decoding does not run; its layer would only take memory
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dtype == torch.int8:  # W8A8 (a quantization_config of msmodelslim): uniform int8, and the
            p.copy_(torch.randint(-127, 128, p.shape, generator=gen, device=device, dtype=torch.int8))
            continue                # scales below make each weight's std _STD (uniform +-127: std 73.3)
        if name.endswith("weight_scale"):
            p.fill_(_STD / 73.3)
            continue
        noise = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32)
        if name.endswith("e_score_correction_bias"):
            value = noise * 0.05
        elif p.dim() == 1:  # norm weights near one, LayerNorm biases near zero
            value = (0.0 if name.endswith(".bias") else 1.0) + noise * 0.1
        else:
            value = noise * _STD
        p.copy_(value)
        del noise, value
    for module in model.modules():
        if isinstance(module, Experts):
            module.prepare_weights()
