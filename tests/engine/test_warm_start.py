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


def test_warm_up_steps_leave_the_engine_as_they_found_it():
    """The start-up warm-up (run on GPUs and NPUs, where kernels compile) writes scratch KV into blocks no
    request holds yet: run here on the CPU, it must change no answer, and every step shape it plans fits."""
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5 + (7 * i + j) % 180 for j in range(9 + 11 * i)]} for i in range(4)]
    plain = LLM(max_num_seqs=MAX_SEQS, seed=1)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    warmed = LLM(max_num_seqs=MAX_SEQS, seed=1)
    runner = warmed.llm_engine.runner
    assert runner.warm_up() == 2 * 4 + 3  # 1, 2, 4, 8 sequences x 2 lengths, a long prompt, two mixed steps
    assert [o.outputs[0].token_ids for o in warmed.generate(prompts, params)] == want
    assert runner._synthetic([(0, 10 ** 6)]) is None  # a shape past the cache is skipped, not run
