#!/usr/bin/env bash
# Fill .whl/ with the wheels benchmarks/gpu_check.sh needs on a GPU machine without them.
#
#   benchmarks/gpu_wheels.sh              # reads the versions from .venv/bin/python
#   PYTHON=/path/to/venv/bin/python benchmarks/gpu_wheels.sh
#
# The GPU machine (CPython 3.12, x86-64, torch, peft, numpy, pyarrow...; no internet) lacks
# DeepSpeed, segment-anything, MONAI and diffusers, and DeepSpeed's pydantic/hjson. This script
# puts one wheel of each into the git-ignored folder .whl/ at exactly the version installed in
# the dev venv (`pip show`), plus timm at the venv's version (the student's backbone: its
# behaviour should not depend on what the GPU image ships). DeepSpeed publishes an sdist only:
# `pip wheel --no-deps` builds a pure-python wheel from it (its ops are JIT-built when used;
# the check uses none). Ray is not carried (its ~70 MB wheel does not fit the 64 MiB the GPU
# machine receives): gpu_check.py needs none. Prints each wheel and the total size beside the
# size of the tracked tree; fails when both together come near 64 MiB.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
out=$repo/.whl
limit_mib=${GPU_TREE_LIMIT_MIB:-56}  # of the 64 MiB a device call takes, with a margin

# downloaded as wheels for CPython 3.12 manylinux x86-64 (pure-python ones match any platform)
downloads=(segment-anything monai diffusers timm hjson pydantic pydantic-core annotated-types
           typing-inspection)

version() {
    local v
    v=$("$py" -m pip show "$1" 2>/dev/null | awk '/^Version:/ {print $2}')
    [[ -n $v ]] || { echo "gpu_wheels: $1 is not installed in $py" >&2; exit 1; }
    echo "$v"
}

# keep .whl/ out of git (and so out of the tree a device call copies unless it is carried)
exclude=$(git -C "$repo" rev-parse --git-path info/exclude)
[[ $exclude = /* ]] || exclude=$repo/$exclude
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

mkdir -p "$out"
rm -f "$out"/*.whl  # one version of each: two stop the install on the GPU machine

pins=()
for name in "${downloads[@]}"; do
    pins+=("$name==$(version "$name")")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$out" "${pins[@]}"
"$py" -m pip wheel -q --no-deps -w "$out" "deepspeed==$(version deepspeed)"

echo "wheels in $out:"
(cd "$out" && du -b ./*.whl | sort -k2 \
     | awk '{printf "  %8.2f MiB  %s\n", $1 / 2^20, substr($2, 3)}')
wheels=$(du -cb "$out"/*.whl | tail -1 | cut -f1)
tracked=$(git -C "$repo" ls-files -z | (cd "$repo" && du -cb --files0-from=- 2>/dev/null) \
          | tail -1 | cut -f1)
total=$((wheels + tracked))
awk -v w="$wheels" -v t="$tracked" -v s="$total" -v l="$limit_mib" 'BEGIN {
    printf "total: wheels %.1f MiB + tracked tree %.1f MiB = %.1f MiB", w / 2^20, t / 2^20,
           s / 2^20
    printf " (limit used here: %d MiB of the 64 a GPU machine receives)\n", l }'
if ((total > limit_mib * 1024 * 1024)); then
    echo "gpu_wheels: wheels and tree exceed $limit_mib MiB" >&2
    exit 1
fi
