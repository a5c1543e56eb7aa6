"""glm5-ascend: serve GLM-5 on Ascend NPUs, CUDA GPUs and the CPU with vLLM's API."""
from glm5_ascend.engine.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name):
    # LLM pulls in the engine and transformers; import it on first use only.
    if name == "LLM":
        from glm5_ascend.llm import LLM
        return LLM
    raise AttributeError(name)
