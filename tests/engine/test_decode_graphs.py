"""Graph-captured decode equals eager decode.

On the CPU there are no graphs, so explicit capture sizes run the same padded path eagerly: the
persistent buffers, padding to the next captured size, padding rows that write nothing, and batches
whose sizes fall between captured sizes as requests join and leave."""
import pytest

from glm5_ascend import LLM, SamplingParams
from glm5_ascend.config import GraphConfig
from glm5_ascend.engine.arg_utils import EngineArgs


@pytest.fixture(scope="module")
def eager():
    return LLM(enforce_eager=True, max_num_seqs=8, seed=3)


def _requests():
    # 7 prompts of different lengths and output lengths: the decode batch shrinks 7, 6, ... 1 and the
    # staggered max_tokens make sizes between the captured 1, 2, 4, 8
    prompts = [{"prompt_token_ids": [(7 * i + j) % 200 + 3 for j in range(5 + 9 * i)]} for i in range(7)]
    params = [SamplingParams(temperature=0, max_tokens=4 + 5 * i, ignore_eos=True) for i in range(7)]
    return prompts, params


def test_padded_graph_path_equals_eager(eager):
    graphs = LLM(cuda_graph_sizes=[1, 2, 4, 8], max_num_seqs=8, seed=3)
    runner = graphs.llm_engine.runner
    assert runner.graphs is not None and runner.graphs.sizes == [1, 2, 4, 8]
    used = []
    run = runner.graphs.run
    runner.graphs.run = lambda step: used.append(len(step.ids)) or run(step)
    prompts, params = _requests()
    want = eager.generate(prompts, params)
    got = graphs.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert {3, 5, 6, 7} & set(used), f"no decode batch fell between captured sizes: {sorted(set(used))}"
    # a second round reuses the prefix cache and joins requests mid-stream with the same graphs
    more = graphs.generate(prompts[::-1], params[::-1])
    assert [o.outputs[0].token_ids for o in more] == [o.outputs[0].token_ids for o in want[::-1]]


def test_padded_graph_path_on_npu_backend(eager):
    """The npu cache kernels take only in-range, distinct slots (the emulator refuses anything else), so
    the padded path must send each padding row to its own scratch slot, never -1."""
    from glm5_ascend import ops
    from tests.ops import emulator
    if emulator.real_torch_npu_present():
        pytest.skip("a real torch_npu is present")
    # The emulator checks the contracts on the host (it reads values), so it runs on the CPU even where the
    # suite runs on a GPU (GLM5_TEST_DEVICE=cuda): the padded path runs eagerly there, as with no graphs.
    with emulator.installed("a3") as torch_npu, pytest.MonkeyPatch.context() as mp:
        mp.setenv("GLM5_OPS_BACKEND", "npu")
        ops.rebind()
        assert ops.resolve("mla_cache_write", "cpu")[0] == "npu"
        graphs = LLM(cuda_graph_sizes=[1, 2, 4, 8], max_num_seqs=8, seed=3, device="cpu")
        runner = graphs.llm_engine.runner
        assert runner.caches[0].latent.shape[0] == runner.num_blocks + 1  # one scratch block (8 <= block size)
        assert runner.graphs.slots.min() >= runner.num_blocks * runner.block_size
        prompts, params = _requests()
        before = torch_npu.calls["npu_scatter_pa_kv_cache"]
        got = graphs.generate(prompts, params)
        assert torch_npu.calls["npu_scatter_pa_kv_cache"] > before
    if eager.llm_engine.runner.device.type != "cpu":
        eager = LLM(enforce_eager=True, max_num_seqs=8, seed=3, device="cpu")
    want = eager.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def test_capture_sizes():
    assert GraphConfig.build(False, None, None, 20, True).capture_sizes == (1, 2, 4, 8, 16, 20)
    assert GraphConfig.build(False, None, 8, 256, True).capture_sizes == (1, 2, 4, 8)
    assert GraphConfig.build(True, [1, 2], None, 20, True).capture_sizes == ()
    assert GraphConfig.build(False, None, None, 20, False).capture_sizes == ()  # CPU default: eager
    assert GraphConfig.build(False, [4, 1, 64], None, 16, False).capture_sizes == (1, 4)
    with pytest.raises(ValueError, match="--cuda-graph-sizes 0 2: sizes must be >= 1"):
        GraphConfig.build(False, [0, 2], None, 20, True)


def test_flags_parse():
    import argparse
    p = argparse.ArgumentParser()
    EngineArgs.add_cli_args(p)
    a = EngineArgs.from_cli_args(p.parse_args(["--cuda-graph-sizes", "1", "2", "4", "--enforce-eager",
                                               "--load-format", "dummy", "--hf-overrides", '{"num_hidden_layers": 2}']))
    assert a.cuda_graph_sizes == [1, 2, 4] and a.enforce_eager and a.load_format == "dummy"
    assert a.hf_overrides == {"num_hidden_layers": 2}
    with pytest.raises(SystemExit):
        p.parse_args(["--hf-overrides", "[1]"])


def test_dummy_weights_and_overrides():
    llm = LLM(load_format="dummy", hf_overrides={"num_hidden_layers": 2, "first_k_dense_replace": 1},
              max_num_seqs=2)
    cfg = llm.llm_engine.config.model
    assert cfg.num_hidden_layers == 2 and len(llm.llm_engine.runner.model.model.layers) == 2
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(temperature=0, max_tokens=4,
                                                                         ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match="--hf-overrides: num_hiden_layers is not a field"):
        LLM(hf_overrides={"num_hiden_layers": 2})


def test_dummy_w8a8_weights():
    """A W8A8 model without a checkpoint (the W8A8 vs bf16 speed comparison needs one at GLM-5's width):
    random int8 weights whose per-row scales give them the float model's spread."""
    import math

    import torch
    llm = LLM(load_format="dummy", hf_overrides={"quantization_config": {"quant_method": "msmodelslim"}},
              enforce_eager=True, max_num_seqs=2)
    model = llm.llm_engine.runner.model
    ints = [p for p in model.parameters() if p.dtype == torch.int8]
    assert ints and all(p.abs().max() > 100 for p in ints)  # spread over the int8 range, not rounded to 0
    scales = [p for n, p in model.named_parameters() if n.endswith("weight_scale")]
    assert scales and all(torch.allclose(s, torch.full_like(s, 0.02 / 73.3)) for s in scales)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(temperature=0, max_tokens=4,
                                                                         ignore_eos=True, logprobs=0))
    assert len(out[0].outputs[0].token_ids) == 4 and math.isfinite(out[0].outputs[0].cumulative_logprob)
