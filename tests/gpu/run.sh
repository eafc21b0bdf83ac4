#!/usr/bin/env bash
# The GPU checks, in one go, on a machine with a CUDA GPU: single GPU fp32 / bf16 / fp16 (GradScaler), FSDP and
# DeepSpeed ZeRO-2/3 with one process. CI has no GPU; there these tests are skipped.
#   bash tests/gpu/run.sh            (from anywhere; sets up .venv first if needed)
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/python ] || make setup
nvidia-smi -L
.venv/bin/python -m pytest -m gpu -v tests/gpu "$@"
