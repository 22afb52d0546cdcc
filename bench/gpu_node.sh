#!/usr/bin/env bash
# What a GPU node runs, from the repository root, with the `make gpu-wheels` bundle in .whl/:
# the wheels installed offline, the node recorded, the GPU check under a timeout that leaves
# room in a 10-minute command; check.json/.md/.log, node.txt and run.log land in $OUT.
#   OUT=DIR bash bench/gpu_node.sh            on the node
#   OUT=DIR bash bench/gpu_node.sh --dry-run  make gpu-rehearsal, on a CPU
set -uo pipefail
: "${OUT:?set OUT to the folder that comes back}"
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-expandable_segments:True}
export LONGACT_CACHE=$PWD/.cache/longact HF_HOME=$PWD/.cache/hf MPLCONFIGDIR=$PWD/.cache/mpl
t0=$(date +%s)
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" .whl/*.whl || exit 3
export PYTHONPATH=$SITE
{
  echo "install: $(($(date +%s) - t0)) s"
  nvidia-smi || echo "nvidia-smi: not found"
  df -h . /tmp
  $PY -c 'import sys, torch, transformers as t
print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", t.__version__)'
} >"$OUT/node.txt" 2>&1
timeout -k 10 "${CHECK_TIMEOUT:-480}" $PY -m bench.gpu_check --out "$OUT" "$@" 2>&1 |
  tee "$OUT/run.log"
rc=${PIPESTATUS[0]}
echo "gpu_check: exit $rc after $(($(date +%s) - t0)) s" | tee -a "$OUT/node.txt"
exit "$rc"
