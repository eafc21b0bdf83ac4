#!/usr/bin/env bash
# Run on a machine WITH network (the CPU machine), before GPU time is spent: downloads into .whl/ (git-ignored) the
# wheels that the GPU machine lacks, for its Python (3.12, manylinux x86-64), so that tests/gpu/run.sh can install
# them there with `pip install --no-index --no-deps`. That machine has no network and no .venv; its python3 holds
# torch, accelerate, transformers, torchvision, tokenizers, timm, lightning, pyarrow, ... (GPU_HAS below) but not
# datasets, wandb, jsonargparse or deepspeed.
#
#   bash tests/gpu/prepare.sh                    (→ .whl/, for CPython 3.12)
#   PY_VERSION=3.11 bash tests/gpu/prepare.sh /tmp/whl311   (the same set for another Python: the CPU proof)
#
# How: pip resolves the framework's missing dependencies for that Python and platform (a dry run, metadata only)
# against the versions the GPU machine is known to hold (GPU_PINS), then downloads each resolved package that is not
# already there (GPU_HAS) with --no-deps: exactly one version of each, nothing of torch / nvidia / triton.
# DeepSpeed has no usable wheel on PyPI (sdist only); a pure-Python wheel (no ops prebuilt: they JIT-compile on first
# use, with the GPU machine's nvcc) is built from the sdist with this project's .venv, which has torch. If that fails,
# the GPU run skips the DeepSpeed cases with a message.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${1:-.whl}
PY_VERSION=${PY_VERSION:-3.12}
LIMIT_MB=64
HOST_PY=${HOST_PY:-python3}          # any Python with pip (it only downloads)
BUILD_PY=${BUILD_PY:-.venv/bin/python}  # a Python with torch, setuptools and wheel: builds the DeepSpeed wheel

# The GPU machine's python3 (2026-11-17, /work/.library/device/KINDS.md): what it already has is never downloaded.
GPU_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"
# Versions read there: the resolver must pick what works with these (datasets needs a huggingface-hub it accepts).
GPU_PINS=${GPU_PINS:-"accelerate==1.15.0 huggingface-hub==1.33.0 numpy==2.5.2 safetensors==0.8.0 tokenizers==0.23.2
transformers==5.17.0 torch==2.11.0 torchvision==0.26.0 torchmetrics==1.9.0 pytorch-lightning==2.6.6 lightning==2.6.6"}
# The framework's runtime dependencies (pyproject.toml) that the GPU machine lacks; deepspeed is handled below.
WANTED=(datasets "wandb>=0.19" "jsonargparse[signatures]>=4.32")

PLATFORM=(--only-binary=:all: --python-version "$PY_VERSION" --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# A recent pip (≥ 24: metadata-only dry runs; pip 23.2 downloaded every wheel and took > 10 minutes).
PIP=("$HOST_PY" -m pip)
if ! "$HOST_PY" -c 'import sys, pip; sys.exit(int(pip.__version__.split(".")[0]) < 24)' 2>/dev/null; then
    "$HOST_PY" -m venv "$WORK/pip" && "$WORK/pip/bin/pip" install -q --upgrade pip
    PIP=("$WORK/pip/bin/python" -m pip)
fi
tr ' ' '\n' <<<"$GPU_PINS" | grep . >"$WORK/pins.txt"

mkdir -p "$DEST"
rm -f "$DEST"/*.whl

# DeepSpeed: a wheel from PyPI if one fits (deepspeed ≥ 0.16 has none so far), else a pure one built from the sdist.
DS_REQ=()
if "${PIP[@]}" download -q --no-deps "${PLATFORM[@]}" -d "$DEST" "deepspeed>=0.16" 2>/dev/null; then
    echo "deepspeed: a wheel from PyPI"
elif [ -x "$BUILD_PY" ] && "$BUILD_PY" -c 'import torch, setuptools, wheel' 2>/dev/null; then
    DS_VERSION=$("$BUILD_PY" -c 'import importlib.metadata as m; print(m.version("deepspeed"))' 2>/dev/null ||
                 echo 0.19.8)
    echo "deepspeed: no wheel on PyPI; building a pure-Python one from the $DS_VERSION sdist (no ops prebuilt) ..."
    if DS_BUILD_OPS=0 "$BUILD_PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/ds" \
            "deepspeed==$DS_VERSION" >"$WORK/ds.log" 2>&1 &&
            ls "$WORK"/ds/deepspeed-*-py3-none-any.whl >/dev/null 2>&1; then
        cp "$WORK"/ds/deepspeed-*-py3-none-any.whl "$DEST"/
    else
        tail -5 "$WORK/ds.log"
        echo "deepspeed: the build failed; the GPU run skips the DeepSpeed cases"
    fi
else
    echo "deepspeed: no wheel on PyPI and no $BUILD_PY with torch to build one; the GPU run skips the DeepSpeed cases"
fi
for wheel in "$DEST"/deepspeed-*.whl; do  # its own needs, less torch (there already), join the resolution
    [ -e "$wheel" ] && mapfile -t DS_REQ < <("$HOST_PY" - "$wheel" <<'EOF'
import re, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    metadata = wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))).decode()
for line in metadata.splitlines():
    if line.startswith("Requires-Dist:") and "extra ==" not in line and not re.match(r"Requires-Dist: torch\b", line):
        print(line.split(":", 1)[1].split(";")[0].strip())
EOF
)
done

# Resolve everything (metadata only) for that Python, against the GPU machine's versions.
"${PIP[@]}" install -q --dry-run --ignore-installed --report "$WORK/report.json" "${PLATFORM[@]}" \
    --target "$WORK/target" -c "$WORK/pins.txt" "${WANTED[@]}" "${DS_REQ[@]}"
"$HOST_PY" - "$WORK/report.json" "$GPU_HAS" >"$WORK/missing.txt" <<'EOF'
import json, re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
has = {norm(name) for name in sys.argv[2].split()}
for item in json.load(open(sys.argv[1]))["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if norm(name) in has or norm(name) == "deepspeed" or re.match(r"(torch|nvidia-|triton|cuda-)", norm(name)):
        continue
    print(f"{name}=={version}")
EOF
echo "missing on the GPU machine: $(tr '\n' ' ' <"$WORK/missing.txt")"
"${PIP[@]}" download -q --no-deps "${PLATFORM[@]}" -d "$DEST" -r "$WORK/missing.txt"

ls -l "$DEST" | awk 'NR > 1 {printf "  %8.1f KiB  %s\n", $5 / 1024, $9}'
TOTAL=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
TENTHS=$((TOTAL * 10 / 1048576))
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $((TOTAL / 1024)) KiB = $((TENTHS / 10)).$((TENTHS % 10)) MiB in all" \
    "(limit $LIMIT_MB MiB per device call)"
[ "$TOTAL" -lt $((LIMIT_MB * 1048576)) ] || { echo "over $LIMIT_MB MiB" >&2; exit 1; }
