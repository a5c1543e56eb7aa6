"""The official torch_npu op contract, read from the torch-npu wheel without importing torch_npu.

Three files of one wheel are parsed:
  torch_npu/op_plugin/meta/_meta_registrations.py  (ast) the meta kernels: `@impl(m, "name")` functions
  torch_npu/_op_plugin_docs.py                      (ast) `_add_torch_npu_docstr("name", doc)` entries
  torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml  the schema the `torch_npu.<name>` binding is
                                                    generated from: parameter order, `*`, defaults
The meta kernels omit some keyword-only markers the binding enforces (e.g. npu_moe_gating_top_k), so a
name's signature is its schema; `meta_params` keeps the meta kernel's parameter names to cross-check.
The wheel is fetched with `pip download --no-deps` and never installed (it breaks `import torch`
without CANN).
"""
from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

TORCH_NPU_VERSION = "2.13.0"  # the release matching torch 2.13; bump both together
META = "torch_npu/op_plugin/meta/_meta_registrations.py"
DOCS = "torch_npu/_op_plugin_docs.py"
SCHEMA = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"
FILES = (META, DOCS, SCHEMA)
_EMPTY = inspect.Parameter.empty


@dataclass
class Contract:
    """Signatures (inspect.Signature) by op name, plus the meta kernels' parameter names and doc names."""

    version: str
    signatures: dict = field(default_factory=dict)
    meta_params: dict = field(default_factory=dict)
    documented: set = field(default_factory=set)

    def exists(self, name: str) -> bool:
        """Officially present: registered as a meta kernel or documented (brief: the two official files)."""
        return name in self.meta_params or name in self.documented


def cache_root() -> Path:
    """GLM5_TORCH_NPU_WHEEL_CACHE, else ~/.cache/glm5_ascend_tests (kept across test sessions)."""
    explicit = os.environ.get("GLM5_TORCH_NPU_WHEEL_CACHE")
    return Path(explicit) if explicit else Path.home() / ".cache" / "glm5_ascend_tests"


def fetch(version: str = TORCH_NPU_VERSION, timeout: float = 300.0) -> Path:
    """Directory holding the three contract files of torch-npu==version; downloads once, then cached.

    Raises RuntimeError with pip's last lines when the wheel cannot be fetched.
    """
    root = cache_root() / f"torch_npu-{version}"
    if all((root / f).is_file() for f in FILES):
        return root
    dl = root / "download"
    dl.mkdir(parents=True, exist_ok=True)
    # Pin platform and ABI so every host reads the same wheel; --no-deps: torch is already here.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp",
           f"torch-npu=={version}", "-d", str(dl)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"pip download torch-npu=={version} failed: {e}") from None
    wheels = sorted(dl.glob("torch_npu-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"pip download torch-npu=={version} failed: {' | '.join(tail)}")
    with zipfile.ZipFile(wheels[0]) as zf:
        for name in FILES:
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
    for w in wheels:
        w.unlink()  # ~45 MB; only the three text files are kept
    return root


def _const(node: ast.AST):
    """Evaluate a default value: literals plus the integer arithmetic the meta file uses ((1 << 63) - 1)."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if isinstance(node, ast.BinOp):
        ops = {ast.Sub: int.__sub__, ast.Add: int.__add__, ast.LShift: int.__lshift__, ast.Mult: int.__mul__}
        if type(node.op) in ops:
            return ops[type(node.op)](_const(node.left), _const(node.right))
    raise ValueError(f"unsupported default expression: {ast.unparse(node)}")


def _parse(src: str) -> ast.Module:
    with warnings.catch_warnings():  # the docs file has invalid escapes in its (Chinese) docstrings
        warnings.simplefilter("ignore")
        return ast.parse(src)


def parse_meta(src: str) -> dict[str, list[str]]:
    """{op name: parameter names} of every `@impl(m, "name")` meta kernel."""
    out = {}
    for node in ast.walk(_parse(src)):
        if not isinstance(node, ast.FunctionDef):
            continue
        for dec in node.decorator_list:
            if (isinstance(dec, ast.Call) and getattr(dec.func, "id", None) == "impl" and len(dec.args) == 2
                    and getattr(dec.args[0], "id", None) == "m" and isinstance(dec.args[1], ast.Constant)):
                a = node.args
                out[dec.args[1].value.split(".")[0]] = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    return out


def parse_docs(src: str) -> set[str]:
    """Names documented with `_add_torch_npu_docstr("name", ...)`."""
    return {n.args[0].value for n in ast.walk(_parse(src))
            if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "_add_torch_npu_docstr"
            and n.args and isinstance(n.args[0], ast.Constant)}


def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "([" and 1 or (-1 if ch in ")]" else 0)
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return parts + ([cur.strip()] if cur.strip() else [])


def _schema_default(text: str):
    if text == "None":
        return None
    if text in ("True", "False"):
        return text == "True"
    if text[:1] in "'\"":
        return text[1:-1]
    if text.startswith("["):
        return [_schema_default(x) for x in _split_top(text[1:-1])]
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text  # a symbolic default (e.g. `Mean`); kept as its text


def parse_schema(src: str) -> dict[str, inspect.Signature]:
    """{op name: Signature} from the codegen yaml's `func:` lines (overloads like `name.List` skipped)."""
    out = {}
    for m in re.finditer(r"func:\s*([A-Za-z0-9_]+)\((.*)\)\s*->", src):
        name, args = m.group(1), m.group(2)
        params, kw_only = [], False
        if re.search(r"\b(from|to|in|is|lambda)\s*(=|,|$)", args):
            continue  # a Python keyword as a parameter name: not callable by keyword from Python anyway
        for arg in _split_top(args):
            if arg == "*":
                kw_only = True
                continue
            decl, _, default = arg.partition("=")
            pname = decl.split()[-1]
            kind = inspect.Parameter.KEYWORD_ONLY if kw_only else inspect.Parameter.POSITIONAL_OR_KEYWORD
            params.append(inspect.Parameter(pname, kind, default=_schema_default(default.strip()) if default else _EMPTY))
        out.setdefault(name, inspect.Signature(params))
    return out


def load(version: str = TORCH_NPU_VERSION) -> Contract:
    root = fetch(version)
    return Contract(version=version,
                    signatures=parse_schema((root / SCHEMA).read_text(encoding="utf-8")),
                    meta_params=parse_meta((root / META).read_text(encoding="utf-8")),
                    documented=parse_docs((root / DOCS).read_text(encoding="utf-8")))
