"""`glm5-ascend bench ops`: time each operator at GLM-5 shapes against the device's measured peaks.

On an accelerator (a CUDA GPU, or an Ascend NPU through torch_npu's torch.npu) it times the backend
the registry picks (cuda / npu, or GLM5_OPS_BACKEND) and the reference, with device events around
each call and the L2 cache flushed before every timed call, after warm-up; the median of --iters
calls is reported. The ceilings are measured on the spot: HBM bandwidth by a 2 GiB device-to-device
copy (bytes read + written), bf16 matmul rate by an 8192^3 torch.matmul on random data, and on CUDA
a read-only pass (Triton). An op's figure is the bytes it must move (each input read once, each
output written once) or its FLOPs, over its median time. On the CPU it runs small shapes through the
reference only, so the command can be exercised anywhere; those figures say nothing about any
accelerator. The npu path has not run on an NPU: none was available to this project.
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from glm5_ascend import ops
from glm5_ascend.platform import current_platform, npu_available, platform_for_device


@dataclass
class Case:
    op: str
    shape: str
    args: tuple
    bytes: float = 0.0
    flops: float = 0.0
    flops_bound: bool = False
    target: str | None = None  # "60%": of the measured peak this op must reach
    check: Callable | None = field(default=None, repr=False)  # (out, reference out) -> str
    # args -> the args the timed backend gets, prepared as a model prepares them once after loading
    prepare: Callable | None = field(default=None, repr=False)


# ------------------------------------------------------------------------------------------- cases
def _paged(B, ctx, block, dims, dtype, dev):
    """Caches of B sequences of ctx tokens in shuffled blocks; block tables, cu_seqlens_q (decode), seq_lens."""
    per = -(-ctx // block)
    tables = torch.randperm(B * per, device=dev).to(torch.int32).view(B, per)
    caches = [torch.randn(B * per, block, d, device=dev, dtype=dtype) for d in dims]
    cu = torch.arange(B + 1, dtype=torch.int32, device=dev)
    return caches, tables, cu, torch.full((B,), ctx, dtype=torch.int32, device=dev)


def _rel_err(out, ref) -> str:
    out, ref = (out[0], ref[0]) if isinstance(out, tuple) else (out, ref)
    return f"rel err {((out.float() - ref.float()).norm() / ref.float().norm()).item():.1e}"


def _exact(out, ref) -> str:
    same = all(torch.equal(a, b) for a, b in zip(out, ref))
    return "bit-identical" if same else "DIFFERS"


def _same_route(out, ref) -> str:
    (w, ids), (rw, rids) = out, ref
    got, want = ids.long().sort(-1), rids.long().sort(-1)
    rows = (got.values == want.values).all(-1).float().mean().item()
    err = ((w.gather(1, got.indices) - rw.gather(1, want.indices)).norm() / rw.norm()).item()
    return f"same experts: {100 * rows:.2f}% of tokens, weights rel err {err:.1e}"


def _set_overlap(out, ref) -> str:
    hits = total = 0
    for a, b in zip(out.cpu(), ref.cpu()):
        a, b = set(a[a >= 0].tolist()), set(b[b >= 0].tolist())
        hits, total = hits + len(a & b), total + len(b)
    return f"same set: {100 * hits / max(1, total):.2f}%"


def case_indexer(dev, small):
    B, ctx, H, D, k = (2, 700, 4, 32, 64) if small else (64, 32768, 32, 128, 2048)
    (cache,), tables, cu, lens = _paged(B, ctx, 128, [D], torch.bfloat16, dev)
    q = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16)
    w = torch.randn(B, H, device=dev) * H ** -0.5
    nbytes = B * ctx * D * 2 + q.numel() * 2 + w.numel() * 4 + B * k * 4
    return Case("lightning_indexer", f"decode B={B} ctx={ctx} {H}x{D} top-{k}",
                (q, w, cache, tables, cu, lens, k, D ** -0.5), bytes=nbytes, flops=2 * B * ctx * H * D,
                target="60%", check=_set_overlap)


def _mla_inputs(dev, B, ctx, H, R, DR, K, q_per_seq=1):
    (lat, rope), tables, _, lens = _paged(B, ctx, 128, [R, DR], torch.bfloat16, dev)
    T = B * q_per_seq
    cu = torch.arange(0, T + 1, q_per_seq, dtype=torch.int32, device=dev)
    pos = (ctx - q_per_seq + torch.arange(q_per_seq, device=dev)).repeat(B)
    causal = torch.arange(ctx, device=dev)[None, :] <= pos[:, None]
    idx = torch.rand(T, ctx, device=dev).masked_fill_(~causal, -1).topk(K, dim=-1)
    # Ascending, -1 padding last: the order the cuda lightning_indexer emits them in, which is what
    # the model passes (torch.topk's score order reads the cache ~2% slower; docs/benchmarks.md).
    idx = torch.where(idx.values >= 0, idx.indices, ctx).sort(dim=-1).values
    idx = idx.masked_fill_(idx == ctx, -1).to(torch.int32)
    ql = torch.randn(T, H, R, device=dev, dtype=torch.bfloat16)
    qr = torch.randn(T, H, DR, device=dev, dtype=torch.bfloat16)
    return (ql, qr, lat, rope, tables, cu, lens, idx, (R + DR) ** -0.5), T


def case_mla_decode(dev, small):
    B, ctx, H, R, DR, K = (2, 700, 8, 64, 16, 64) if small else (64, 32768, 64, 512, 64, 2048)
    args, T = _mla_inputs(dev, B, ctx, H, R, DR, K)
    nbytes = T * K * (R + DR) * 2 + T * H * (2 * R + DR) * 2 + T * K * 4
    return Case("sparse_mla_attention", f"decode B={B} ctx={ctx} H={H} {R}+{DR} top-{K}", args,
                bytes=nbytes, flops=2 * T * H * K * (2 * R + DR), target="60%", check=_rel_err)


def case_mla_prefill(dev, small):
    ctx, T, H, R, DR, K = (300, 64, 8, 64, 16, 64) if small else (8192, 2048, 64, 512, 64, 2048)
    args, T = _mla_inputs(dev, 1, ctx, H, R, DR, K, q_per_seq=T)
    return Case("sparse_mla_attention", f"prefill T={T} ctx={ctx} H={H} {R}+{DR} top-{K}", args,
                flops=2 * T * H * K * (2 * R + DR), flops_bound=True, check=_rel_err)


def case_cache_write(dev, small):
    T, R, DR, DI = (64, 64, 16, 32) if small else (4096, 512, 64, 128)
    caches, _, _, _ = _paged(1, 2 * T, 128, [R, DR, DI], torch.bfloat16, dev)
    slots = torch.randperm(2 * T, device=dev)[:T]
    new = [torch.randn(T, d, device=dev, dtype=torch.bfloat16) for d in (R, DR, DI)]
    return Case("mla_cache_write", f"T={T} {R}+{DR}+{DI}", (new[0], new[1], new[2], slots, *caches),
                bytes=2 * T * (R + DR + DI) * 2 + T * 8)


def _routing(dev, T, E, k):
    return torch.randn(T, E, device=dev).topk(k, dim=-1).indices.to(torch.int32)


def case_grouped_mlp(dev, small):
    T, E, k, D, I = (64, 8, 2, 128, 64) if small else (4096, 256, 8, 6144, 2048)
    x = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
    from glm5_ascend.ops.moe.reference import moe_permute
    permuted, _, counts = moe_permute(x, _routing(dev, T, E, k), E)
    w13 = torch.randn(E, 2 * I, D, device=dev, dtype=torch.bfloat16) * D ** -0.5
    w2 = torch.randn(E, D, I, device=dev, dtype=torch.bfloat16) * I ** -0.5
    N = permuted.shape[0]
    return Case("grouped_mlp", f"{T} tok x {E} experts top-{k}, {D}->{I}", (permuted, counts, w13, w2),
                bytes=(w13.numel() + w2.numel() + 2 * N * D) * 2, flops=2 * N * 3 * D * I,
                flops_bound=True, target="65%", check=_rel_err,
                prepare=lambda a: (*a[:2], *ops.prepare_expert_weights(*a[2:])))


def case_route(dev, small):
    T, E, k = (64, 16, 4) if small else (4096, 256, 8)
    logits = torch.randn(T, E, device=dev)
    return Case("moe_route", f"T={T} E={E} top-{k}", (logits, torch.randn(E, device=dev) * 0.1, k, 1, 1, 2.5, True),
                bytes=T * E * 4 + E * 4 + T * k * 8, check=_same_route)


def case_permute(dev, small):
    T, E, k, D = (64, 8, 2, 128) if small else (4096, 256, 8, 6144)
    x = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
    return Case("moe_permute", f"T={T} top-{k} D={D}", (x, _routing(dev, T, E, k), E),
                bytes=T * D * 2 + T * k * D * 2 + T * k * 12, check=_exact)


def case_unpermute(dev, small):
    T, E, k, D = (64, 8, 2, 128) if small else (4096, 256, 8, 6144)
    ids = _routing(dev, T, E, k)
    order = torch.argsort(ids.view(-1).long(), stable=True)
    rows = torch.randn(T * k, D, device=dev, dtype=torch.bfloat16)
    return Case("moe_unpermute", f"T={T} top-{k} D={D}", (rows, order, torch.rand(T, k, device=dev)),
                bytes=T * k * D * 2 + T * D * 2 + T * k * 12, check=_rel_err)


CASES = {
    "lightning_indexer": case_indexer, "sparse_mla_decode": case_mla_decode,
    "sparse_mla_prefill": case_mla_prefill, "mla_cache_write": case_cache_write,
    "grouped_mlp": case_grouped_mlp, "moe_route": case_route, "moe_permute": case_permute,
    "moe_unpermute": case_unpermute,
}


# ------------------------------------------------------------------------------------------ timing
class Timer:
    """Median seconds of fn(). On an accelerator (cuda, npu): device events around each call, the L2
    flushed before it, and the device kept busy while Python launches it, so launch gaps are not
    timed; on the CPU, the wall clock."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mod = platform_for_device(device).module() if device.type != "cpu" else None
        if self.mod is None:
            return
        # Flush with 4x the L2 (at least 256 MB); a device that does not report its L2 gets 1 GiB.
        l2 = getattr(self.mod.get_device_properties(device), "L2_cache_size", 0) or (256 << 20)
        self.flush = torch.empty(max(4 * l2, 256 << 20) // 4, dtype=torch.int32, device=device)
        if device.type != "cuda":  # no spin kernel there: a 4096^3 bf16 matmul holds the device instead
            self.busy = [torch.randn(4096, 4096, device=device, dtype=torch.bfloat16) for _ in range(2)]

    def _hold(self) -> None:
        if self.device.type == "cuda":
            torch.cuda._sleep(1_000_000)  # ~0.5 ms
        else:
            torch.matmul(*self.busy)

    def __call__(self, fn, iters: int, warmup: int = 3) -> float:
        for _ in range(warmup):
            fn()
        if self.mod is None:
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
        events = [(self.mod.Event(enable_timing=True), self.mod.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            self.flush.zero_()  # evict the last call's data: every call starts from HBM
            self._hold()
            start.record()
            fn()
            end.record()
        self.mod.synchronize(self.device)
        return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3


try:  # the read-only ceiling needs Triton, which CPU-only hosts may lack (only GPUs measure it)
    import triton
    import triton.language as tl

    @triton.jit
    def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
        base = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
        acc = tl.zeros([BLOCK], tl.float32)
        for i in range(ITERS):
            o = base + i * BLOCK + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + o, mask=o < n, other=0.0).to(tl.float32)
        tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))
except ImportError:
    _read_kernel = None


def measure_read_bandwidth(device: torch.device, timer: Timer) -> float:
    """Bytes/s of one pass that only reads 4 GiB of bf16: the ceiling of ops that mostly read
    (the copy's figure also pays for writing). 0.0 off CUDA or where Triton is missing."""
    if _read_kernel is None or device.type != "cuda":
        return 0.0
    x = torch.randn(1 << 31, device=device, dtype=torch.bfloat16)
    block, iters = 4096, 16
    grid = -(-x.numel() // (block * iters))
    part = torch.empty(grid, device=device)
    t = timer(lambda: _read_kernel[(grid,)](x, part, x.numel(), BLOCK=block, ITERS=iters, num_warps=8), 20)
    return x.numel() * 2 / t


def measure_peaks(device: torch.device, timer: Timer, copy_bytes: int = 2 << 30, n: int = 8192,
                  dtype: torch.dtype = torch.bfloat16, iters: int = 20) -> tuple[float, float]:
    """(bytes/s of a device copy of copy_bytes, read + write; FLOP/s of an n^3 matmul on random data)."""
    bufs = [torch.randn(copy_bytes // 4, device=device)]
    bufs.append(torch.empty_like(bufs[0]))
    bw = 2 * bufs[0].numel() * 4 / timer(lambda: bufs[1].copy_(bufs[0]), iters)
    bufs.clear()  # free the copy's buffers before the matmul
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return bw, 2 * n ** 3 / timer(lambda: torch.matmul(a, b), iters)


def _fmt_time(s: float) -> str:
    return f"{s * 1e6:.1f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def _apply_overrides(items: list[str]) -> None:
    """--set dsa.mla_block_n=32: change a cuda backend launch setting for this run."""
    for item in items:
        try:
            key, value = item.split("=", 1)
            family, name = key.split(".", 1)
            cfg = importlib.import_module(f"glm5_ascend.ops.{family}.cuda").CONFIG
        except (ValueError, ImportError):
            raise ValueError(f"--set {item!r}: expected FAMILY.KEY=VALUE, FAMILY dsa or moe, on a CUDA host") from None
        if name not in cfg:
            raise ValueError(f"--set {item!r}: no setting {name!r}; {family} has {', '.join(cfg)}")
        old = cfg[name]
        kind = float if isinstance(old, float) else int
        try:
            cfg[name] = value if isinstance(old, str) else None if value == "None" else kind(value)
        except ValueError:
            raise ValueError(f"--set {item!r}: {name} takes {'a number' if kind is float else 'an integer'} "
                             f"(now {old!r})") from None


def run_case(name: str, device: torch.device, timer: Timer, iters: int, peaks: tuple[float, float]) -> dict:
    small = device.type == "cpu"
    case = CASES[name](device, small)
    backend, fn = ops.resolve(case.op, device.type)
    ref_fn = getattr(importlib.import_module(f"glm5_ascend.ops.{ops._FAMILY[case.op]}.reference"), case.op)
    if fn is ref_fn or getattr(fn, "__module__", "").endswith(".reference"):
        backend = f"{backend} (= reference)" if backend != "reference" else backend
    row = {"op": name, "shape": case.shape, "backend": backend if not small else "reference", "target": case.target}
    row["ref_time"] = timer(lambda: ref_fn(*case.args), max(3, iters // 10), warmup=1)
    t = row["ref_time"]
    if not small and not backend.startswith("reference") and "(= reference)" not in backend:
        args = case.prepare(case.args) if case.prepare else case.args
        t = row["time"] = timer(lambda: fn(*args), iters)
        if case.check:
            row["check"] = case.check(fn(*args), ref_fn(*case.args))
        del args
    bw, flops = peaks
    if case.flops_bound:
        row["achieved"], row["pct"] = f"{case.flops / t / 1e12:.3g} TFLOP/s", case.flops / t / flops
    else:
        row["achieved"], row["pct"] = f"{case.bytes / t / 1e9:.3g} GB/s", case.bytes / t / bw
    if case.flops and case.bytes and not small:  # the floor set by both ceilings
        row["floor"] = max(case.bytes / bw, case.flops / flops)
    return row


def table(rows: list[dict], accel: bool) -> str:
    out = ["| op | shape | backend | time | achieved | % of measured peak | target | roofline floor "
           "| reference | speedup | check vs reference |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        t = r.get("time", r["ref_time"])
        pct = f"{100 * r['pct']:.0f}%" if accel else "n/a (cpu)"
        target = r["target"] or ""
        if target and accel:
            miss = float(target.rstrip("%")) - 100 * r["pct"]
            target += " met" if miss <= 0 else f" MISSED by {miss:.0f} pts"
        floor = _fmt_time(r["floor"]) if "floor" in r else ""
        speed = f"{r['ref_time'] / t:.1f}x" if "time" in r else "1.0x"
        out.append(f"| {r['op']} | {r['shape']} | {r['backend']} | {_fmt_time(t)} | {r['achieved']} | {pct} | "
                   f"{target} | {floor} | {_fmt_time(r['ref_time'])} | {speed} | {r.get('check', '')} |")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------- cli
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ops", default="all", help=f"comma-separated subset of: {', '.join(CASES)} (default: all)")
    parser.add_argument("--device", default=None,
                        help="npu, npu:N, cuda, cuda:N or cpu (default: the platform's, as serve picks it)")
    parser.add_argument("--iters", type=int, default=50, help="timed calls per op; the median is reported")
    parser.add_argument("--output", default=None, metavar="FILE", help="append the table and this command to FILE")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FAMILY.KEY=VALUE",
                        help="override a cuda launch setting, e.g. dsa.mla_block_n=32 (repeatable)")


def _device(name: str | None) -> torch.device:
    if name is None:
        return current_platform().device()
    kind = name.split(":")[0]
    if kind not in ("npu", "cuda", "cpu"):
        raise ValueError(f"--device {name}: bench ops runs on npu, npu:N, cuda, cuda:N or cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is visible; use --device cpu")
    if kind == "npu" and not npu_available():
        raise ValueError(f"--device {name}: torch_npu or an NPU is missing; install glm5-ascend[npu] on an "
                         "Ascend host, or use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device; use npu, npu:N, cuda, cuda:N or cpu") from None


def _torch_npu_version() -> str:
    import torch_npu
    return getattr(torch_npu, "__version__", "?")


def main(args: argparse.Namespace) -> int:
    device = _device(args.device)
    names = list(CASES) if args.ops == "all" else [s.strip() for s in args.ops.split(",") if s.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"--ops: unknown {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if args.iters < 1:
        raise ValueError("--iters must be at least 1")
    _apply_overrides(args.overrides)
    torch.manual_seed(0)
    accel = device.type != "cpu"
    timer = Timer(device)
    if accel:
        mod = timer.mod
        if device.index is not None:
            mod.set_device(device)
        peaks = measure_peaks(device, timer)
        read = measure_read_bandwidth(device, timer)
        mod.empty_cache()
        read_text = f"{read / 1e12:.2f} TB/s" if read else "n/a (needs Triton on CUDA)"
        versions = f"torch {torch.__version__}"
        if device.type == "npu":
            versions += f", torch_npu {_torch_npu_version()}"
        header = (f"{mod.get_device_name(device)}, {versions}. Measured ceilings: "
                  f"HBM copy {peaks[0] / 1e12:.2f} TB/s (% column), HBM read-only {read_text}, "
                  f"bf16 matmul 8192^3 {peaks[1] / 1e12:.0f} TFLOP/s. "
                  f"Median of {args.iters} calls (reference: {max(3, args.iters // 10)}), L2 flushed before each.")
    else:
        peaks = (float("nan"), float("nan"))
        header = "CPU, reference backend only, small shapes (not GLM-5's): these figures say nothing about an accelerator."
    print(header, flush=True)
    rows = []
    for name in names:
        rows.append(run_case(name, device, timer, args.iters, peaks))
        print(f"  {name}: {_fmt_time(rows[-1].get('time', rows[-1]['ref_time']))}", file=sys.stderr, flush=True)
        if accel:
            timer.mod.empty_cache()
    text = table(rows, accel)
    print(text)
    if args.output:
        cmd = " ".join(["glm5-ascend", "bench", "ops"] + [a for a in sys.argv[1:] if a not in ("bench", "ops")])
        with open(args.output, "a") as f:
            f.write(f"\nCommand: `{cmd}`\n\n{header}\n\n{text}\n")
    return 0
