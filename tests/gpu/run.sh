#!/usr/bin/env bash
# The GPU check, in one command, on a machine with a CUDA GPU (and no network, no .venv): the gpu-marked tests (fp32,
# bf16, fp16 with a GradScaler, FSDP and DeepSpeed ZeRO-2/3 with one process, ...), the transformers Llama with sdpa
# and framework_chunked (MFU), loop parity, the bf16 speed-up and channels_last, attention at long contexts. Each part
# has its own time cap, all of them 7 minutes at most; one results file ($OUT/gpu_results.json when $OUT is set,
# else gpu_results/gpu_results.json) and one table. See benchmarks/gpu.py.
#
#   bash tests/gpu/prepare.sh           (first, on a machine with network: the missing wheels into .whl/)
#   bash tests/gpu/run.sh               (on the GPU machine; carry .whl/ along)
#   bash tests/gpu/run.sh --dry-run     (anywhere, no GPU: every import and argument checked, tests collected and
#                                        skipped; exits 0 when all is well. CI runs this.)
#   PYTHON=.venv/bin/python bash tests/gpu/run.sh --dry-run     (another interpreter than python3)
# Other arguments go to benchmarks/gpu.py (e.g. --parts tests llama, --budget 300, --smoke).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}

# The wheels prepare.sh downloaded (datasets, wandb, jsonargparse, deepspeed, ...), when this Python lacks the
# framework's dependencies: installed beside, not into, its own packages, which stay as they are. (A Python that has
# them, as the project's .venv, is used as it is.) WHEELS=DIR: wheels from another folder than .whl/.
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null && ! "$PYTHON" -c 'import datasets, wandb, jsonargparse' 2>/dev/null; then
    SITE=${GPU_SITE:-/tmp/gpu_site}
    echo "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS/ into $SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl
    export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false

if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then  # the whole output comes back too, not only its tail
    exec > >(tee "$OUT/gpu_run.log") 2>&1
fi
if [ "${1:-}" != "--dry-run" ]; then
    nvidia-smi -L || echo "nvidia-smi: not found or failed"
fi
exec "$PYTHON" benchmarks/gpu.py "$@"
