"""AsyncEngine: the LLMEngine step loop on a background thread, fed from asyncio.

The LLMEngine is single-threaded, so exactly one thread (the step thread) ever
touches it. The event loop talks to that thread through a thread-safe command
queue (add / abort) and gets RequestOutputs back on per-request asyncio queues
via ``loop.call_soon_threadsafe``. The step thread sleeps on an Event while
there is no work, so an idle server burns no CPU.

A step that raises fails the requests in flight (their generators raise
``EngineError``) and the loop carries on; only a failure of the loop itself
(or of cleaning up after a failed step) marks the engine dead, after which
``errored`` is true and /health answers 503.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from glm5_ascend.engine.errors import EngineDeadError, EngineError
from glm5_ascend.engine.sampling_params import SamplingParams
from glm5_ascend.engine.sequence import RequestOutput

logger = logging.getLogger(__name__)
__all__ = ["AsyncEngine", "EngineDeadError", "EngineError", "RequestStats"]


@dataclass
class RequestStats:
    """What the metrics need about one finished (or aborted) request."""

    request_id: str
    prompt_tokens: int
    generation_tokens: int
    finish_reasons: list[str]
    arrival: float
    first_scheduled: float | None
    first_token: float | None
    finished: float
    inter_token_latencies: list[float] = field(default_factory=list)
    choice_generation_tokens: list[int] = field(default_factory=list)  # per choice (n > 1)
    n: int = 1  # the request's sampling parameters, for vllm:request_params_*
    max_tokens: int | None = None
    choice_preemptions: list[int] = field(default_factory=list)  # per choice
    last_token: float | None = None


@dataclass
class _Track:
    """Step-thread bookkeeping of one request in flight."""

    prompt_tokens: int
    arrival: float
    n: int = 1
    max_tokens: int | None = None
    last_token_time: float | None = None
    itl: list[float] = field(default_factory=list)


_ADD, _ABORT = "add", "abort"


class AsyncEngine:
    """Runs ``engine.step()`` off the event loop; ``generate()`` is the async entry point."""

    def __init__(self, engine, on_request_done: Callable[[RequestStats], None] | None = None,
                 on_dead: Callable[[str], None] | None = None):
        self.engine = engine
        self.on_request_done = on_request_done
        self.on_dead = on_dead  # called once, with the reason, when the engine dies
        self.on_step: Callable[[int], None] | None = None  # tokens each engine step ran (metrics)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}  # event-loop side
        self._tracks: dict[str, _Track] = {}  # step-thread side
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stalled_steps = 0
        self._refusal: Exception | None = None  # set by abort_all: what new requests get
        self.dead_reason: str | None = None
        self.stats: dict = engine.stats()  # snapshot, refreshed by the step thread

    # ---------------------------------------------------------------- lifecycle (event loop)
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="glm5-step-loop", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the step thread, then the engine's other ranks (the server's lifespan ends here, before
        uvicorn re-raises a SIGTERM it caught)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        stop = getattr(self.engine, "shutdown", None)
        if stop is not None:
            stop()

    @property
    def errored(self) -> bool:
        return self.dead_reason is not None or (self._thread is not None and not self._thread.is_alive()
                                                and not self._stopping)

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ---------------------------------------------------------------- requests (event loop)
    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield cumulative RequestOutputs until finished. Closing or cancelling it aborts the request.

        Outputs that pile up while the consumer is busy are merged: only the newest is
        yielded, which loses nothing because every output holds the whole text so far.
        """
        if self.errored:
            raise EngineDeadError(self.dead_reason or "the engine step loop has stopped")
        if self._refusal is not None:
            raise self._refusal
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._send((_ADD, request_id, list(prompt_ids), params, prompt, time.monotonic()))
        finished = False
        try:
            while True:
                item = await stream.get()
                while not stream.empty() and not isinstance(item, BaseException) and not item.finished:
                    item = stream.get_nowait()
                if isinstance(item, BaseException):
                    finished = True  # the step thread has already dropped it
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send((_ABORT, request_id))

    def abort(self, request_id: str) -> None:
        self._send((_ABORT, request_id))

    def abort_all(self, err: Exception) -> int:
        """On the event loop (shutdown): end every request in flight, and every later one, with `err` (their
        generators raise it) and abort them in the engine. Returns how many were in flight."""
        self._refusal = err
        rids = list(self._streams)
        for rid in rids:
            self._streams[rid].put_nowait(err)
            self._send((_ABORT, rid))
        return len(rids)

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    def _dispatch(self, items: list[tuple[str, object]]) -> None:
        """On the event loop: hand each output (or error) to its request's queue."""
        for rid, item in items:
            stream = self._streams.get(rid)
            if stream is not None:
                stream.put_nowait(item)

    def _deliver(self, items: list[tuple[str, object]]) -> None:
        if items and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._dispatch, items)

    # ---------------------------------------------------------------- step thread
    def _run(self) -> None:
        try:
            while not self._stopping:
                self._wake.clear()  # before draining, so a command sent meanwhile still wakes us
                self._drain()
                if not self.engine.has_unfinished_requests():
                    self.stats = self.engine.stats()
                    self._wake.wait()
                    continue
                self._step()
        except EngineDeadError as e:  # a rank died: the engine says which
            self._die(str(e))
        except BaseException as e:  # noqa: BLE001 - the loop itself failed: the engine is dead
            logger.exception("engine step loop died")
            self._die(f"the engine step loop died: {type(e).__name__}: {e}")

    def _drain(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == _ADD:
                self._add(*cmd[1:])
            else:
                self._abort(cmd[1])

    def _add(self, rid: str, ids: list[int], params: SamplingParams, prompt: str | None, arrival: float) -> None:
        try:
            self.engine.add_request(rid, ids, params, prompt=prompt, arrival=arrival)
        except Exception as e:  # noqa: BLE001 - bad input: fail this request only
            self._deliver([(rid, e if isinstance(e, ValueError) else EngineError(str(e)))])
            return
        self._tracks[rid] = _Track(len(ids), arrival, params.n, params.max_tokens)

    def _abort(self, rid: str) -> None:
        out = self.engine.abort_request(rid)
        track = self._tracks.pop(rid, None)
        if out is not None:
            self._deliver([(rid, out)])  # a caller still iterating generate() gets the "abort" finish
            if track is not None:
                self._report(out, track, time.monotonic())

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except EngineDeadError:
            raise
        except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving
            logger.exception("engine step failed; failing %d request(s) in flight", len(self._tracks))
            self._fail_all(EngineError(f"the engine failed while running this request: {type(e).__name__}: {e}"))
            return
        now = time.monotonic()
        tokens = getattr(self.engine, "last_step_tokens", 0)
        if tokens and self.on_step is not None:
            try:
                self.on_step(tokens)
            except Exception:  # noqa: BLE001 - metrics must never take the loop down
                logger.exception("metrics callback failed")
        items = []
        for out in outputs:
            track = self._tracks.get(out.request_id)
            if track is not None and sum(out.new_token_counts or [1]):
                if track.last_token_time is not None:
                    track.itl.append(now - track.last_token_time)
                track.last_token_time = now
            if out.finished and track is not None:
                del self._tracks[out.request_id]
                self._report(out, track, now)
            items.append((out.request_id, out))
        self.stats = self.engine.stats()
        self._deliver(items)
        stalled = not outputs and self.stats.get("num_running", 1) == 0
        self._stalled_steps = self._stalled_steps + 1 if stalled else 0
        if self._stalled_steps >= 2 and self._tracks:
            # Nothing runs and nothing can be admitted: waiting would spin forever.
            self._fail_all(EngineError("the request cannot be scheduled: it does not fit in the KV cache"))

    def _fail_all(self, err: Exception) -> None:
        rids = list(self._tracks)
        self._tracks.clear()
        for rid in rids:
            self.engine.abort_request(rid)  # raises only if the engine is broken: then the loop dies
        self.stats = self.engine.stats()
        self._deliver([(rid, err) for rid in rids])

    def _report(self, out: RequestOutput, track: _Track, now: float) -> None:
        if self.on_request_done is None:
            return
        m = out.metrics
        stats = RequestStats(
            out.request_id, track.prompt_tokens, sum(len(o.token_ids) for o in out.outputs),
            [o.finish_reason or "abort" for o in out.outputs], track.arrival,
            m.first_scheduled_time if m else None, m.first_token_time if m else None, now, track.itl,
            [len(o.token_ids) for o in out.outputs], track.n, track.max_tokens,
            list(m.num_preemptions) if m else [], track.last_token_time)
        try:
            self.on_request_done(stats)
        except Exception:  # noqa: BLE001 - metrics must never take the loop down
            logger.exception("metrics callback failed")

    def kill(self, reason: str) -> None:
        """From any thread: the engine cannot serve any more (e.g. a rank died); /health turns 503 and
        every request in flight fails with `reason`."""
        self._die(reason)

    def _die(self, reason: str) -> None:
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._fail_streams, EngineDeadError(reason))
        if self.on_dead is not None:
            self.on_dead(reason)

    def _fail_streams(self, err: Exception) -> None:
        """On the event loop: every request in flight (even one not yet added) gets err."""
        for stream in self._streams.values():
            stream.put_nowait(err)
