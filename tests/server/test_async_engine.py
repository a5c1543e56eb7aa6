"""AsyncEngine: the step loop on its own thread, against a scripted stand-in for LLMEngine."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from glm5_ascend.engine.async_engine import AsyncEngine, EngineDeadError, EngineError
from glm5_ascend.engine.sampling_params import SamplingParams
from glm5_ascend.engine.sequence import CompletionOutput, RequestMetrics, RequestOutput


class ScriptedEngine:
    """LLMEngine's interface: each request gains one token "x" per step until max_tokens."""

    def __init__(self, step_delay: float = 0.0):
        self.requests: dict[str, list] = {}
        self.aborted: list[str] = []
        self.step_delay = step_delay
        self.fail_next_step = False
        self.break_loop = False
        self.idle_checks = 0
        self.threads: set[str] = set()

    def _out(self, rid, ids, n, reason):
        text = "x" * n
        outs = [CompletionOutput(0, text, [120] * n, None, None, reason)]
        return RequestOutput(rid, None, ids, outs, reason is not None, metrics=RequestMetrics(0.0, 0.0, 0.0),
                             new_token_counts=[1])

    def add_request(self, rid, ids, params, prompt=None, arrival=None):
        self.threads.add(threading.current_thread().name)
        if not ids:
            raise ValueError("The prompt is empty; send at least one token.")
        self.requests[rid] = [ids, 0, params.max_tokens]

    def abort_request(self, rid):
        req = self.requests.pop(rid, None)
        if req is None:
            return None
        self.aborted.append(rid)
        return self._out(rid, req[0], req[1], "abort")

    def has_unfinished_requests(self):
        self.threads.add(threading.current_thread().name)
        if self.break_loop:
            raise SystemError("scheduler state corrupted")
        self.idle_checks += 1
        return bool(self.requests)

    def step(self):
        self.threads.add(threading.current_thread().name)
        time.sleep(self.step_delay)
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("kaboom")
        outs = []
        for rid, req in list(self.requests.items()):
            req[1] += 1
            done = req[1] >= req[2]
            outs.append(self._out(rid, req[0], req[1], "length" if done else None))
            if done:
                del self.requests[rid]
        return outs

    def stats(self):
        return {"num_running": len(self.requests), "num_waiting": 0, "kv_cache_usage": 0.1 * len(self.requests)}


def run(engine: ScriptedEngine, body, done=None):
    """Start an AsyncEngine on a fresh loop, run body(async_engine), shut down."""
    async def main():
        ae = AsyncEngine(engine, on_request_done=done)
        ae.start()
        try:
            return await body(ae)
        finally:
            ae.shutdown()
    return asyncio.run(main())


async def collect(ae, rid, max_tokens=3, ids=(1, 2)):
    return [out async for out in ae.generate(list(ids), SamplingParams(max_tokens=max_tokens), rid)]


def test_generate_yields_until_finished_and_reports():
    eng, reports = ScriptedEngine(), []
    outs = run(eng, lambda ae: collect(ae, "a", 4), done=reports.append)
    assert outs[-1].finished and outs[-1].outputs[0].text == "xxxx"
    assert all(not o.finished for o in outs[:-1])
    (r,) = reports
    assert r.request_id == "a" and r.prompt_tokens == 2 and r.generation_tokens == 4
    # One gap per engine step after the first token (the scripted engine makes one token a step);
    # the consumer may be handed several steps' tokens at once, so len(outs) can be smaller.
    assert r.finish_reasons == ["length"] and len(r.inter_token_latencies) == r.generation_tokens - 1
    assert eng.threads == {"glm5-step-loop"}  # only the step thread touched the engine


def test_concurrent_requests_all_complete():
    async def body(ae):
        return await asyncio.gather(*(collect(ae, f"r{i}", 2 + i % 5) for i in range(32)))
    results = run(ScriptedEngine(), body)
    assert [len(r[-1].outputs[0].text) for r in results] == [2 + i % 5 for i in range(32)]


def test_bad_request_fails_only_itself():
    async def body(ae):
        with pytest.raises(ValueError, match="empty"):
            await collect(ae, "bad", ids=())
        return await collect(ae, "good")
    assert run(ScriptedEngine(), body)[-1].finished


def test_step_failure_fails_in_flight_and_keeps_serving():
    eng = ScriptedEngine(step_delay=0.01)

    async def body(ae):
        gen = ae.generate([1], SamplingParams(max_tokens=100), "victim")
        first = await gen.__anext__()
        eng.fail_next_step = True
        with pytest.raises(EngineError, match="kaboom"):
            async for _ in gen:
                pass
        assert not ae.errored and "victim" not in eng.requests  # freed
        return first, await collect(ae, "after")
    first, after = run(eng, body)
    assert first.outputs[0].text == "x" and after[-1].finished


@pytest.mark.parametrize("how", ["aclose", "cancel"])
def test_disconnect_aborts_and_frees(how):
    eng, reports = ScriptedEngine(step_delay=0.005), []

    async def body(ae):
        if how == "aclose":
            gen = ae.generate([1], SamplingParams(max_tokens=10_000), "gone")
            await gen.__anext__()
            await gen.aclose()
        else:
            task = asyncio.create_task(collect(ae, "gone", 10_000))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        for _ in range(200):
            if eng.aborted:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        return ae.stats, ae.num_in_flight
    stats, in_flight = run(eng, body, done=reports.append)
    assert eng.aborted == ["gone"] and not eng.requests and in_flight == 0
    assert stats["kv_cache_usage"] == 0 and reports[0].finish_reasons == ["abort"]


def test_dead_loop_marks_errored_and_refuses():
    eng = ScriptedEngine(step_delay=0.01)

    async def body(ae):
        gen = ae.generate([1], SamplingParams(max_tokens=1000), "r")
        await gen.__anext__()
        eng.break_loop = True
        with pytest.raises(EngineDeadError, match="corrupted"):
            async for _ in gen:
                pass
        assert ae.errored
        with pytest.raises(EngineDeadError):
            await collect(ae, "late")
        return True
    assert run(eng, body)


def test_idle_loop_sleeps():
    eng = ScriptedEngine()

    async def body(ae):
        await collect(ae, "a", 2)
        await asyncio.sleep(0.05)
        before = eng.idle_checks
        await asyncio.sleep(0.4)
        return eng.idle_checks - before
    assert run(eng, body) <= 1  # no polling while idle


def test_abort_ends_the_callers_generate_with_abort():
    """AsyncEngine.abort(rid) from elsewhere: the caller still iterating gets the "abort" finish, no hang."""
    async def body(ae):
        outs = []

        async def consume():
            async for out in ae.generate([1, 2], SamplingParams(max_tokens=10_000), "victim"):
                outs.append(out)
                if len(outs) == 2:
                    ae.abort("victim")
        await asyncio.wait_for(consume(), timeout=10)
        return outs

    eng = ScriptedEngine(step_delay=0.01)
    outs = run(eng, body)
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert eng.aborted == ["victim"] and not eng.requests
