"""No compile after start-up: once the engine is built (what `serve` does before /health turns 200),
the first request at each batch size from 1 to --max-num-seqs runs within 1.5x a warm one.

On a GPU (GLM5_TEST_DEVICE=cuda) a Triton compile or an autotune costs seconds, so a first request
that pays one fails this by far; on the CPU nothing compiles and this checks the bookkeeping alone.
The 0.1 s of slack absorbs a loaded CI host's scheduling noise, far below any compile."""
import itertools
import time

from glm5_ascend import LLM, SamplingParams

MAX_SEQS = 8


def test_first_request_at_each_batch_size_runs_warm():
    llm = LLM(max_num_seqs=MAX_SEQS, seed=0)
    fresh = itertools.count()  # a new prompt every time: the prefix cache must not serve a warm run
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    def timed(batch: int) -> float:
        prompts = [{"prompt_token_ids": [3 + (next(fresh) * 13 + j) % 200 for j in range(10)]} for _ in range(batch)]
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
        return elapsed

    slow = []
    for batch in range(1, MAX_SEQS + 1):
        first = timed(batch)
        warm = min(timed(batch) for _ in range(2))
        if first > 1.5 * warm + 0.1:
            slow.append(f"batch {batch}: first {first * 1e3:.0f} ms, warm {warm * 1e3:.0f} ms")
    assert not slow, "first requests paid a compile: " + "; ".join(slow)
