"""The ranks of one engine across processes and nodes: rendezvous, process groups, heartbeats, shutdown.

One process per device, torch.distributed underneath; nothing home-made on the wire:

- **Rendezvous.** Rank 0 hosts a TCPStore (under torchrun, torchrun's agent does). Every rank
  writes its host, pid and config.json digest there; rank 0 waits for all of them (naming the ranks
  that never came), checks that every node has the same config.json, and only then do the ranks
  create the process group (hccl | nccl | gloo) over the same store, and the groups of
  distributed.create_groups.
- **Processes.** With the `spawn` launcher the node's first rank starts the node's other ranks
  (torch.multiprocessing, spawn); they die with it (PR_SET_PDEATHSIG) and ignore Ctrl-C, which the
  first rank handles for the node. Under torchrun every rank is torchrun's.
- **Liveness.** Every rank but 0 adds to a heartbeat counter in the store each second; rank 0's
  monitor declares a rank dead when its counter stalls for GLM5_HEARTBEAT_TIMEOUT or its local
  process exits, and tells the engine (so /health turns 503) with the rank, host and pid. A rank
  that loses rank 0's store, or sees the shutdown key, exits at once.
"""
from __future__ import annotations

import ctypes
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from glm5_ascend import envs
from glm5_ascend.config import EngineConfig
from glm5_ascend.distributed import ParallelState, create_groups
from glm5_ascend.platform import platform_for_device

logger = logging.getLogger(__name__)

_KEY = "glm5/"
_BEAT_S = 1.0


class Cluster:
    """This process's rank: its store, groups (`ps`), device, and the local ranks it started."""

    def __init__(self, config: EngineConfig, rank: int, store, procs: list | None = None):
        self.config, self.rank, self.store = config, rank, store
        self.pc = config.parallel
        self.procs = procs or []  # [(rank, process)] started by this process
        self.platform = platform_for_device(config.device)
        index = self.pc.device_index if self.pc.launcher == "torchrun" else rank - self.pc.first_rank
        self.device = self.platform.device(index)
        self.ps: ParallelState | None = None
        self.members: dict[int, dict] = {}
        self.fault: str | None = None
        self._on_fault: list[Callable[[str], None]] = []
        self._closed = False

    # ---------------------------------------------------------------- start
    @classmethod
    def start(cls, config: EngineConfig) -> "Cluster":
        """This node's main process (rank first_rank; under torchrun, any rank): open the store, start the
        node's other ranks, join."""
        pc = config.parallel
        platform = platform_for_device(config.device)
        rank = pc.first_rank
        _pin_threads(platform.name, pc.num_local_ranks)
        platform.set_device(pc.device_index if pc.launcher == "torchrun" else 0)
        store = _open_store(pc, rank)
        if pc.master_port is None:  # one node, a free port: the children need the real one
            config = dataclasses.replace(config, parallel=dataclasses.replace(pc, master_port=store.port))
        procs = []
        if pc.launcher == "spawn":
            ctx = mp.get_context("spawn")
            for r in range(rank + 1, rank + pc.num_local_ranks):
                p = ctx.Process(target=_spawned_rank, args=(config, r, os.getpid()), name=f"glm5-rank{r}",
                                daemon=True)
                _start_without_main(p)
                procs.append((r, p))
        cluster = cls(config, rank, store, procs)
        try:
            cluster._join()
        except BaseException:
            cluster.shutdown()
            raise
        return cluster

    @classmethod
    def join_spawned(cls, config: EngineConfig, rank: int) -> "Cluster":
        pc = config.parallel
        platform = platform_for_device(config.device)
        _pin_threads(platform.name, pc.num_local_ranks)
        platform.set_device(rank - pc.first_rank)
        cluster = cls(config, rank, _open_store(pc, rank))
        cluster._join()
        return cluster

    def _join(self) -> None:
        pc = self.pc
        me = {"host": socket.gethostname(), "pid": os.getpid(), "config": _config_digest(self.config.model_path)}
        self.store.set(f"{_KEY}join/{self.rank}", json.dumps(me))
        if self.rank == 0:
            self.members = self._wait_joined()
            verdict = self._check_members() or "ok"
            self.store.set(f"{_KEY}verdict", verdict)
        else:
            verdict = self._wait_key(f"{_KEY}verdict", envs.startup_timeout()).decode()
        if verdict != "ok":
            raise ValueError(verdict)
        timeout = datetime.timedelta(seconds=envs.collective_timeout())
        dist.init_process_group(self.platform.dist_backend, store=dist.PrefixStore(f"{_KEY}pg", self.store),
                                rank=self.rank, world_size=pc.world_size, timeout=timeout)
        self.ps = create_groups(pc.tensor_parallel_size, pc.data_parallel_size, pc.enable_expert_parallel,
                                self.rank, self.platform.dist_backend, timeout)
        target = self._monitor if self.rank == 0 else self._beat
        threading.Thread(target=target, name="glm5-liveness", daemon=True).start()

    def _wait_joined(self) -> dict[int, dict]:
        world, deadline = self.pc.world_size, time.monotonic() + envs.startup_timeout()
        while True:
            missing = [r for r in range(world) if not self.store.check([f"{_KEY}join/{r}"])]
            if not missing:
                return {r: json.loads(self.store.get(f"{_KEY}join/{r}")) for r in range(world)}
            self._raise_if_local_died()
            if time.monotonic() > deadline:
                raise ValueError(
                    f"rank(s) {_ranges(missing)} of {world} did not join within {envs.startup_timeout():.0f} s: start "
                    f"their node(s) (same flags, their --node-rank) or check that they reach "
                    f"{self.pc.master_addr}:{self.pc.master_port or self.store.port} (GLM5_STARTUP_TIMEOUT sets the wait)")
            time.sleep(0.2)

    def _check_members(self) -> str | None:
        mine = self.members[0]["config"]
        for r, m in sorted(self.members.items()):
            if m["config"] != mine:
                return (f"rank {r} ({m['host']}) has another config.json at {self.config.model_path} (sha256 "
                        f"{m['config'][:12]} vs rank 0's {mine[:12]}); copy the same checkpoint to every node")
        return None

    def _wait_key(self, key: str, timeout: float | None = None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.store.check([key]):
            if self.fault:
                raise RuntimeError(self.fault)
            self._raise_if_local_died()
            if deadline is not None and time.monotonic() > deadline:
                raise ValueError(f"rank {self.rank}: rank 0 did not answer within {timeout:.0f} s; check node 0's log")
            time.sleep(0.1)
        return self.store.get(key)

    def _raise_if_local_died(self) -> None:
        for r, p in self.procs:
            if p.exitcode is not None:
                raise RuntimeError(f"{self.describe(r)} {self._exit_text(r, p.exitcode)}")

    # ---------------------------------------------------------------- after loading
    def agree_min(self, name: str, value: int) -> int:
        """The smallest `value` over all ranks (every rank calls it once per name); a store round, so it
        waits as long as the slowest rank loads without a collective timing out."""
        self.store.set(f"{_KEY}{name}/{self.rank}", str(value))
        if self.rank == 0:
            values = [int(self._wait_key(f"{_KEY}{name}/{r}")) for r in range(self.pc.world_size)]
            self.store.set(f"{_KEY}{name}", str(min(values)))
        return int(self._wait_key(f"{_KEY}{name}"))

    def build_runner(self, eos_token_ids: set[int] = frozenset()):
        """This rank's ModelRunner: its shard loaded, then a KV cache of the block count every rank can hold."""
        from glm5_ascend.engine.model_runner import ModelRunner
        runner = ModelRunner(self.config, eos_token_ids, self.ps, self.device)
        runner.allocate_cache(self.agree_min("kv_blocks", runner.available_blocks()))
        return runner

    # ---------------------------------------------------------------- liveness
    def on_fault(self, callback: Callable[[str], None]) -> None:
        """Call `callback(message)` (from the monitor thread) when a rank is found dead."""
        self._on_fault.append(callback)
        if self.fault:
            callback(self.fault)

    def explain(self, error: BaseException) -> str:
        """Why a step failed across the ranks: the dead rank, once the monitor (rank 0) has found it."""
        deadline = time.monotonic() + (3 * _BEAT_S if self.rank == 0 else 0)
        while self.fault is None and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.fault or (f"rank {self.rank}: a step failed across the ranks ({type(error).__name__}: "
                              f"{str(error)[:300]}); restart the engine")

    def describe(self, rank: int) -> str:
        m = self.members.get(rank)
        return f"rank {rank} ({m['host']}, pid {m['pid']})" if m else f"rank {rank}"

    def _exit_text(self, rank: int, code: int) -> str:
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        key = f"{_KEY}error/{rank}"
        error = self.store.get(key).decode() if self.store.check([key]) else ""
        return how + (f": {error}" if error else "")

    def _monitor(self) -> None:
        """Rank 0: a rank whose heartbeat stalls or whose process exits is dead."""
        try:
            client = _client(self.pc, self.store.port)
            seen = {r: (-1, time.monotonic()) for r in range(1, self.pc.world_size)}
            while not self._closed and self.fault is None:
                now = time.monotonic()
                for r, p in self.procs:
                    if p.exitcode is not None and not self._closed:
                        return self._declare(f"{self.describe(r)} {self._exit_text(r, p.exitcode)}")
                for r, (count, since) in seen.items():
                    value = client.add(f"{_KEY}hb/{r}", 0)
                    if value != count:
                        seen[r] = (value, now)
                    elif now - since > envs.heartbeat_timeout():
                        return self._declare(f"{self.describe(r)} stopped responding: no heartbeat for "
                                             f"{now - since:.0f} s (hung, or its node is unreachable)")
                time.sleep(_BEAT_S)
        except Exception as e:  # noqa: BLE001 - the monitor must say why it stopped
            if not self._closed:
                self._declare(f"rank 0 lost its own rendezvous store ({e})")

    def _declare(self, message: str) -> None:
        self.fault = message
        logger.error("%s; the engine stops", message)
        for callback in self._on_fault:
            try:
                callback(message)
            except Exception:  # noqa: BLE001
                logger.exception("fault callback failed")

    def _beat(self) -> None:
        """Every rank but 0: heartbeat; leave at once when rank 0 is gone or says shut down."""
        parent = os.getppid()
        try:
            client = _client(self.pc, self.pc.master_port)
            while True:
                client.add(f"{_KEY}hb/{self.rank}", 1)
                if client.check([f"{_KEY}shutdown"]):
                    client.add(f"{_KEY}bye", 1)  # rank 0 keeps its store up until every rank has seen this
                    os._exit(0)
                if self.pc.launcher == "spawn" and self.rank != self.pc.first_rank and os.getppid() != parent:
                    os._exit(1)  # our node's first rank is gone (PDEATHSIG covers most cases)
                time.sleep(_BEAT_S)
        except Exception as e:  # noqa: BLE001
            print(f"glm5-ascend: rank {self.rank}: lost rank 0's store ({type(e).__name__}); rank 0 has exited, "
                  "so this rank exits too", flush=True)
            os._exit(1)

    # ---------------------------------------------------------------- stop
    def shutdown(self) -> None:
        """Stop every rank (the shutdown key reaches all nodes), reap local ones, leave the process group."""
        if self._closed:
            return
        self._closed = True
        try:
            self.store.set(f"{_KEY}shutdown", "1")
            if self.rank == 0:  # ranks on other nodes read the key from this process's store: let them
                seen_by = time.monotonic() + 3 * _BEAT_S  # (a dead rank never answers: bounded)
                while self.store.add(f"{_KEY}bye", 0) < self.pc.world_size - 1 and time.monotonic() < seen_by:
                    time.sleep(0.05)
        except Exception:  # noqa: BLE001 - the store may already be gone
            pass
        deadline = time.monotonic() + 10
        for _, p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
        for _, p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawned_rank(config: EngineConfig, rank: int, parent_pid: int) -> None:
    """Entry point of a rank started by its node's first rank."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the node's first rank's to handle
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s %(asctime)s rank{rank} %(name)s: %(message)s")
    from glm5_ascend.engine.executor import run_rank
    cluster = None
    try:
        cluster = Cluster.join_spawned(config, rank)
        run_rank(cluster)
    except Exception as e:  # noqa: BLE001 - one line, recorded for rank 0 to name
        message = f"{type(e).__name__}: {e}"
        print(f"glm5-ascend: rank {rank}: error: {message}", flush=True)
        if cluster is not None:
            try:
                cluster.store.set(f"{_KEY}error/{rank}", message[:2000])
            except Exception:  # noqa: BLE001
                pass
        os._exit(1)
    os._exit(0)  # no interpreter teardown: gloo's threads may abort in it


def _start_without_main(process) -> None:
    """Start a spawn-method process without re-running the caller's main script in it: the rank needs
    nothing from it, and a script calling LLM(tensor_parallel_size=2) at top level (no __main__ guard)
    would otherwise start the ranks again from inside each rank."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    if main is not None:
        main.__dict__.pop("__file__", None)
        main.__spec__ = None
    try:
        process.start()
    finally:
        if main is not None:
            main.__dict__.update(saved)


def _open_store(pc, rank: int):
    """Rank 0's TCPStore server (unless torchrun's agent hosts it), or a client of it."""
    timeout = datetime.timedelta(seconds=envs.startup_timeout())
    if rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        try:
            return dist.TCPStore(pc.master_addr, pc.master_port or 0, None, True, timeout, wait_for_workers=False)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot open the rendezvous on {pc.master_addr}:{pc.master_port} ({e}); pick another "
                             "--master-port or stop the process using it") from None
    _wait_reachable(pc.master_addr, pc.master_port, rank, envs.startup_timeout())
    return dist.TCPStore(pc.master_addr, pc.master_port, None, False, timeout)


def _client(pc, port: int):
    """A second connection to the store, for a liveness thread (short timeout: a stall is the news)."""
    return dist.TCPStore(pc.master_addr, port, None, False, datetime.timedelta(seconds=10))


def _wait_reachable(addr: str, port: int, rank: int, timeout: float) -> None:
    """Before torch's TCPStore client (whose failure is pages of C++ log): a plain connect, retried."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((addr, port), timeout=2):
                return
        except OSError as e:
            last = e.strerror or type(e).__name__
        time.sleep(0.5)
    raise ValueError(f"rank {rank} cannot reach node 0's rendezvous at {addr}:{port} within {timeout:.0f} s ({last}): "
                     "start node 0 first, or check --master-addr / --master-port and the firewall")


def _config_digest(model_path: str) -> str:
    path = Path(model_path) / "config.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def _die_with_parent(parent_pid: int) -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the heartbeat thread watches the parent instead
    if os.getppid() != parent_pid:
        os._exit(1)


def _pin_threads(platform: str, local_ranks: int) -> None:
    """On the CPU, share the cores between this node's ranks (GLM5_CPU_THREADS or OMP_NUM_THREADS, if set,
    give each rank's count instead; platform.cpu_threads)."""
    if platform == "cpu" and local_ranks > 1:
        from glm5_ascend.platform import cpu_threads
        torch.set_num_threads(cpu_threads(local_ranks=local_ranks))


def _ranges(ranks: list[int]) -> str:
    out, start = [], ranks[0]
    for a, b in zip(ranks, ranks[1:] + [None]):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)
