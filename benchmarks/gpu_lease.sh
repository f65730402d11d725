#!/usr/bin/env bash
# One call on a lent GPU machine (not a test, never run by CI): the GPU benchmark of the training steps
# and decodes (benchmarks.gpu) and the click latency of interactive repair (benchmarks.clicks), written
# under $OUT, which the lending tool copies back. That machine's Python carries torch but not the
# imaging packages: their wheels travel in .whl/ (nibabel, connected-components-3d, edt, fill-voids,
# fastremap for Python 3.12, x86-64) and are installed into /tmp/site first.
#
#   bash benchmarks/gpu_lease.sh [GPU_BUDGET_S] [CLICKS_TIMEOUT_S]
#
# CLICKS_TIMEOUT_S 0 leaves the clicks out. The two budgets keep the whole call inside one 10-minute command with room for a rerun of the lease.
set -uo pipefail
gpu_budget=${1:-300}
clicks_timeout=${2:-200}
out=${OUT:?the lending tool sets OUT}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "installing the carried wheels failed" >&2; exit 1; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c "import torch, nibabel, cc3d, edt, fill_voids; print('torch', torch.__version__, torch.cuda.get_device_name())"

start=$(date +%s)
timeout $((gpu_budget + 60)) python3 -m benchmarks.gpu --out "$out/gpu" --device cuda --budget-s "$gpu_budget" \
  2>&1 | tee "$out/gpu.log"
echo "benchmarks.gpu: $(( $(date +%s) - start )) s"

[ "$clicks_timeout" -gt 0 ] || exit 0
# the clicks' model is fitted in /tmp (its checkpoint folder would not come back); its tables are copied
start=$(date +%s)
timeout "$clicks_timeout" python3 -m benchmarks.clicks --out /tmp/clicks --device cuda 2>&1 | tee "$out/clicks.log"
echo "benchmarks.clicks: $(( $(date +%s) - start )) s"
mkdir -p "$out/clicks"
cp /tmp/clicks/clicks.csv /tmp/clicks/final.csv /tmp/clicks/clicks.md "$out/clicks/" 2>/dev/null
ls -R "$out"
