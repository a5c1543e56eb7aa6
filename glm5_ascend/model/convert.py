"""`glm5-ascend convert SRC DST --to {bf16,w8a8,fp8}`: rewrite a GLM-5 checkpoint, streaming.

Sources: BF16 (or any float), FP8 block-scaled (GLM-5-FP8) or msmodelslim W8A8 checkpoints.
Targets (docs/checkpoints.md):
  bf16  every quantized weight dequantized to bfloat16; other tensors as stored; no quantization_config
  w8a8  msmodelslim's W8A8_DYNAMIC layout: int8 weights with per-row scales, quant_model_description.json
  fp8   e4m3 weights with 128x128 block scales and GLM-5-FP8's quantization_config
Weights of modules matching --keep (default quant.DEFAULT_KEEP) stay in high precision.

Memory: the output shards are planned from the source's headers (names, shapes, dtypes) before any
data is read, so each shard's safetensors header is written first and its tensors follow in slices of
rows: a process holds one slice of one tensor at a time, whatever the tensor or shard size.
Resuming: each shard is written to `<name>.partial` and renamed when complete; `.convert-state.json`
records the plan and the finished shards, so a rerun with the same arguments skips them and the
result is byte-identical. config.json and the index are written last: an interrupted conversion never
looks like a complete checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from glm5_ascend.config import MSMODELSLIM_DESCRIPTION, ModelConfig
from glm5_ascend.model import quant
from glm5_ascend.model.loader import INDEX_FILE, _Handles, _scales, _source, checkpoint_files

STATE_FILE = ".convert-state.json"
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
_ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
             torch.int8: "I8", torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL",
             torch.float8_e4m3fn: "F8_E4M3"}
_TORCH_DTYPE = {v: k for k, v in _ST_DTYPE.items()}
_CHUNK_BYTES = 8 << 20  # one slice of rows read, converted and written at a time
_SKIP_COPY = {"config.json", INDEX_FILE, MSMODELSLIM_DESCRIPTION, STATE_FILE}


@dataclass
class Unit:
    """One source tensor and the tensors it becomes: outputs [(name, safetensors dtype, shape)]."""

    name: str
    kind: str  # copy | dequant | w8a8 | fp8
    outputs: list

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * _TORCH_DTYPE[dt].itemsize for _, dt, shape in self.outputs)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1GiB' or a number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"--max-shard-size {text!r}: give a size such as 5GB, 500MB or a number of bytes")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index(m.group(2).upper() or "_"))


def plan_units(src_names: dict, to: str, keep) -> list[Unit]:
    """src_names: {name: (safetensors dtype, shape)} of the source's weights (scales excluded)."""
    units = []
    for name in sorted(src_names):
        dtype, shape = src_names[name]
        quantized_src = quant.is_fp8_dtype(dtype) or quant.is_int8_dtype(dtype)
        module = name[:-len(".weight")] if name.endswith(".weight") else None
        target = (to in ("w8a8", "fp8") and module is not None and len(shape) == 2
                  and not quant.keep_high_precision(module, keep))
        if target and to == "w8a8":
            outs = [(name, "I8", shape), (f"{module}.{quant.W8A8_SCALE}", "F32", (shape[0], 1)),
                    (f"{module}.{quant.W8A8_OFFSET}", "F32", (shape[0], 1))]
            units.append(Unit(name, "w8a8", outs))
        elif target:
            bn, bk = FP8_CONFIG["weight_block_size"]
            outs = [(name, "F8_E4M3", shape),
                    (f"{module}.{quant.FP8_SCALE}", "F32", (math.ceil(shape[0] / bn), math.ceil(shape[1] / bk)))]
            units.append(Unit(name, "fp8", outs))
        elif quantized_src:
            units.append(Unit(name, "dequant", [(name, "BF16", shape)]))
        else:
            units.append(Unit(name, "copy", [(name, dtype, shape)]))
    return units


def shard_plan(units: list[Unit], max_bytes: int) -> list[list[Unit]]:
    shards, current, size = [], [], 0
    for u in units:
        if current and size + u.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(u)
        size += u.nbytes
    if current:
        shards.append(current)
    return shards


def _rows_per_chunk(shape, itemsize: int, align: int = 128) -> int:
    row = max(1, math.prod(shape[1:]) * itemsize)
    rows = max(1, _CHUNK_BYTES // row)
    return max(align, rows // align * align) if len(shape) > 1 else shape[0] if shape else 1


def _emit(unit: Unit, source):
    """(output name, tensor slice) in file order; each output's slices are consecutive rows."""
    shape = unit.outputs[0][2]
    if not shape:  # a scalar
        yield unit.outputs[0][0], source[...].to(_TORCH_DTYPE[unit.outputs[0][1]])
        return
    n = shape[0]
    step = _rows_per_chunk(shape, 4)
    scales = []
    for r in range(0, n, step):
        rows = source[r:min(n, r + step)]
        if unit.kind == "w8a8":
            q, s = quant.quantize_int8_rows(rows)
            scales.append(s)
            yield unit.name, q
        elif unit.kind == "fp8":
            q, s = quant.quantize_fp8_block(rows, tuple(FP8_CONFIG["weight_block_size"]))
            scales.append(s)
            yield unit.name, q
        else:
            yield unit.name, rows.to(_TORCH_DTYPE[unit.outputs[0][1]])
    if unit.kind == "w8a8":
        s = torch.cat(scales)[:, None]
        yield unit.outputs[1][0], s
        yield unit.outputs[2][0], torch.zeros_like(s)
    elif unit.kind == "fp8":
        yield unit.outputs[1][0], torch.cat(scales)


def _header(units: list[Unit]) -> bytes:
    header, offset = {}, 0
    for u in units:
        for name, dtype, shape in u.outputs:
            size = math.prod(shape) * _TORCH_DTYPE[dtype].itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_shard(path: Path, units: list[Unit], open_source, bar=None) -> int:
    """Write one safetensors shard, slice by slice, atomically (path.partial, then renamed). -> bytes."""
    head = _header(units)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(head)
        for u in units:
            expect = {name: (dtype, shape) for name, dtype, shape in u.outputs}
            written = dict.fromkeys(expect, 0)
            for name, t in _emit(u, open_source(u.name)):
                dtype, shape = expect[name]
                if _ST_DTYPE.get(t.dtype) != dtype:
                    raise RuntimeError(f"convert: {name} came out {t.dtype}, planned {dtype}")
                data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(memoryview(data))
                written[name] += t.numel()
            for name, (dtype, shape) in expect.items():
                if written[name] != math.prod(shape):
                    raise RuntimeError(f"convert: {name} wrote {written[name]} of {math.prod(shape)} elements")
            if bar is not None:
                bar.update(u.nbytes)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


def _source_listing(src: Path, files: dict, scale_names: set) -> dict:
    from glm5_ascend.model.loader import _open
    out = {}
    for f in sorted(set(files.values())):
        handle = _open(f)
        for name in handle.keys():
            if name in files and files[name] == f and name not in scale_names:
                sl = handle.get_slice(name)
                out[name] = (sl.get_dtype(), tuple(sl.get_shape()))
    return out


def _fingerprint(src: Path, files: dict, args: dict) -> str:
    h = hashlib.sha256(json.dumps(args, sort_keys=True).encode())
    for f in sorted(set(files.values())):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def convert(src: str | Path, dst: str | Path, to: str, keep=quant.DEFAULT_KEEP, max_shard_size: int = 5 * 10**9,
            progress: bool = True) -> Path:
    """Convert checkpoint src into dst (created; resumed if an earlier run with the same arguments stopped)."""
    if to not in ("bf16", "w8a8", "fp8"):
        raise ValueError(f"--to {to!r}: choose bf16, w8a8 or fp8")
    src, dst = Path(src), Path(dst)
    cfg = ModelConfig.from_pretrained(src)  # validates the source (architecture, quantization_config)
    files = checkpoint_files(src)
    scales = _scales(files, cfg.quantization_config)
    state_path = dst / STATE_FILE
    if (dst / "config.json").exists() and not state_path.exists():
        raise ValueError(f"{dst} already holds a checkpoint; give convert an empty or new directory")
    fingerprint = _fingerprint(src, files, {"to": to, "keep": list(keep), "max_shard_size": max_shard_size})
    state = json.loads(state_path.read_text()) if state_path.exists() else None
    if state is not None and state.get("fingerprint") != fingerprint:
        raise ValueError(f"{dst} holds an unfinished conversion of another source or with other arguments; "
                         "remove it or rerun that conversion")
    dst.mkdir(parents=True, exist_ok=True)
    done = set(state["done"]) if state else set()
    listing = _source_listing(src, files, scales["all"])
    shards = shard_plan(plan_units(listing, to, keep), max_shard_size)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    handles, block = _Handles(), quant.fp8_block(cfg.quantization_config)
    sizes = {n: len(_header(s)) + sum(u.nbytes for u in s) for n, s in zip(names, shards)}
    todo = [(n, s) for n, s in zip(names, shards)
            if not (n in done and (dst / n).is_file() and (dst / n).stat().st_size == sizes[n])]
    bar = tqdm(total=sum(sum(u.nbytes for u in s) for _, s in todo), desc=f"Converting to {to}", unit="B",
               unit_scale=True, mininterval=1.0) if progress else None
    try:
        for n, shard in todo:
            write_shard(dst / n, shard, lambda name: _source(handles, files[name], name, scales, block), bar)
            done.add(n)
            _atomic_write(state_path, json.dumps({"fingerprint": fingerprint, "done": sorted(done)}))
    finally:
        if bar is not None:
            bar.close()
    _finish(src, dst, to, shards, names, cfg, listing)
    state_path.unlink()
    return dst


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def _finish(src: Path, dst: Path, to: str, shards, names, cfg: ModelConfig, listing: dict) -> None:
    """The small files, last: tokenizer and friends, description, index, and config.json at the very end."""
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in _SKIP_COPY:
            shutil.copy2(f, dst / f.name)
    weight_map = {name: n for n, s in zip(names, shards) for u in s for name, _, _ in u.outputs}
    total = sum(u.nbytes for s in shards for u in s)
    if to == "w8a8":
        types = {"model_quant_type": "W8A8_DYNAMIC"}
        for s in shards:
            for u in s:
                for name, _, _ in u.outputs:
                    types[name] = "W8A8_DYNAMIC" if u.kind == "w8a8" else "FLOAT"
        _atomic_write(dst / MSMODELSLIM_DESCRIPTION, json.dumps(types, indent=2) + "\n")
    _atomic_write(dst / INDEX_FILE, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                               indent=2) + "\n")
    raw = json.loads((src / "config.json").read_text())
    raw.pop("quantization_config", None)
    if to == "fp8":
        raw["quantization_config"] = dict(FP8_CONFIG)
    _atomic_write(dst / "config.json", json.dumps(raw, indent=2) + "\n")
