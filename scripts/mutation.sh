#!/usr/bin/env bash
# Mutation testing with mutmut (outside CI: too slow for 2 cores). Usage:
#   bash scripts/mutation.sh engine|ops|server|model [OUT_DIR]
# Runs on a scratch copy of HEAD (never the working tree), niced, over one package and the fast tests
# that cover it, and writes OUT_DIR/<package>.txt (every mutant and its status) and a summary line.
# docs/testing.md records the rates, the survivors judged harmless and why.
set -euo pipefail
pkg="${1:?usage: scripts/mutation.sh engine|ops|server|model [OUT_DIR]}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="$(realpath -m "${2:-/tmp/glm5-mutation-results}")"
mkdir -p "$out"
python3 -c "import mutmut" 2>/dev/null || python3 -m pip install "mutmut==3.8.1"

extra=""
case "$pkg" in
  engine)  # the CPU bookkeeping and sampling; llm_engine / model_runner need the model per mutant (hours)
    # sampler.py too with MUTATE_SAMPLER=1: ~650 more mutants at ~2 s each (test_sampling_distribution)
    mutate='"glm5_ascend/engine/block_manager.py", "glm5_ascend/engine/sampling_params.py",
            "glm5_ascend/engine/detokenizer.py"'"${MUTATE_SAMPLER:+, \"glm5_ascend/engine/sampler.py\"}"
    tests='"tests/engine/test_prefix_cache.py", "tests/engine/test_sampling_distribution.py",
           "tests/engine/test_detokenizer.py", "tests/engine/test_sampling.py::test_invalid_sampling_params_raise",
           "tests/engine/test_sampling_params_bounds.py"'
    extra=', "-k", "not test_engine_"' ;;  # the tiny-model tests of test_prefix_cache take ~6 s a mutant
  ops)
    mutate='"glm5_ascend/ops/dsa/reference.py", "glm5_ascend/ops/moe/reference.py", "glm5_ascend/ops/quant/reference.py"'
    tests='"tests/ops/test_reference.py", "tests/ops/test_quant_ops.py", "tests/ops/test_npu_emulator_math.py"' ;;
  server)
    mutate='"glm5_ascend/server/serving_*.py"'
    tests='"tests/server/test_chat_output.py", "tests/server/test_parsers.py", "tests/server/test_async_engine.py"' ;;
  model)
    mutate='"glm5_ascend/model/*.py"'
    tests='"tests/model/test_parity.py", "tests/model/test_loader.py", "tests/model/test_quant_fp8.py",
           "tests/model/test_quant_w8a8.py"' ;;
  *) echo "unknown package: $pkg (engine, ops, server or model)" >&2; exit 2 ;;
esac

work="/tmp/glm5-mutation-$pkg"  # kept afterwards for `mutmut show NAME` / `mutmut browse` there
rm -rf "$work" && mkdir -p "$work"
git -C "$repo" archive HEAD | tar -x -C "$work"
# glm5_ascend.ops is installed from ops/ through setup.cfg's package_dir; mutmut mutates one source
# tree, so the copy holds ops/ inside the package, where `import glm5_ascend.ops` then finds it.
cp -r "$work/ops" "$work/glm5_ascend/ops"
cat >> "$work/pyproject.toml" <<EOF

[tool.mutmut]
source_paths = ["glm5_ascend"]
only_mutate = [$mutate]
pytest_add_cli_args_test_selection = [$tests]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"$extra]
process_isolation = "forkserver"
EOF
cd "$work"
export OMP_NUM_THREADS=1 GLM5_CACHE_DIR="$work/.glm5-cache"
start=$(date +%s)
nice -n 19 python3 -m mutmut run --max-children "${MUTMUT_CHILDREN:-2}" || true
python3 -m mutmut results --all true > "$out/$pkg.txt" 2>&1 || true
: > "$out/$pkg-survivors.diff"
for name in $(sed -n 's/^ *\([^ ]*__mutmut_[0-9]*\): survived$/\1/p' "$out/$pkg.txt"); do
  python3 -m mutmut show "$name" >> "$out/$pkg-survivors.diff" 2>&1 || true
done
python3 - "$out/$pkg.txt" "$pkg" "$(( $(date +%s) - start ))" <<'EOF'
import collections, sys
path, pkg, secs = sys.argv[1:]
status = collections.Counter()
for line in open(path):
    if ":" in line and "__mutmut_" in line:
        status[line.rsplit(":", 1)[1].strip()] += 1
total = sum(status.values())
survived = status.get("survived", 0)
print(f"{pkg}: {total} mutants, {dict(status)}, survived {survived} "
      f"({100 * survived / max(total, 1):.1f} %), {secs} s")
EOF
