#!/usr/bin/env bash
# Create (idempotently) the virtual environment that runs GPTQModel, the third-party reader used to
# check that hfcompress's GPTQ "v1" exports load and run outside hfcompress. It is kept apart from
# the project's own environment because GPTQModel pins numpy, transformers, torchao, ... on its own.
#
#   bash benchmarks/peers/setup_gptqmodel.sh
#   "${HFCOMPRESS_BENCH_HOME:-$HOME/.cache/hfcompress-bench}/gptqmodel-venv/bin/python" \
#       benchmarks/peers/gptqmodel_logits.py --model DIR --ids FILE --out FILE --json FILE
#
# Version choice (read from the sdists' requirements.txt):
#   gptqmodel 7.7.0 (newest) requires torch>=2.14.1 and transformers>=5.20.2. torch 2.14.1 is not
#                   on this machine's disk, and from PyPI it is a multi-GB CUDA build, so 7.7.0
#                   cannot be installed next to the CPU wheel torch 2.13.0.
#   gptqmodel 7.6.0 requires torch>=2.8.0, transformers>=5.14.0, numpy==2.2.6, torchao>=0.18.0:
#                   the newest release that fits torch 2.13.0. Installed here.
# GPTQModel is published as an sdist only (no wheel on PyPI), but its setup.py builds no extension:
# the CUDA/C++ kernels (marlin, exllama, machete, ...) are compiled just-in-time, on first use, and
# only for the backends that need them. The TORCH backend is pure PyTorch, so nothing is compiled
# (there is no BUILD_CUDA_EXT / GPTQMODEL_FORCE_BUILD switch in 7.x any more; older releases
# had one, and it is still exported as 0 below, harmlessly, for safety).
# torch is installed FIRST and then held by a constraint, so that no later step replaces the CPU
# wheel. Override the versions with GPTQMODEL_VERSION / TORCH_VERSION.
set -euo pipefail

BENCH_HOME="${HFCOMPRESS_BENCH_HOME:-$HOME/.cache/hfcompress-bench}"
VENV="$BENCH_HOME/gptqmodel-venv"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
GPTQMODEL_VERSION="${GPTQMODEL_VERSION:-7.6.0}"

mkdir -p "$BENCH_HOME"
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)

installed() {  # installed VERSION of a distribution in the venv, empty if absent
    "$VENV/bin/python" - "$1" <<'EOF' 2>/dev/null || true
import sys
from importlib.metadata import version
try:
    print(version(sys.argv[1]))
except Exception:
    pass
EOF
}

# 1. torch first (the CPU wheel; local version "+cpu" satisfies ==2.13.0).
have_torch="$(installed torch)"
if [ "${have_torch%%+*}" != "$TORCH_VERSION" ]; then
    "${PIP[@]}" install "torch==$TORCH_VERSION"
fi

# 2. GPTQModel and its requirements, with torch held where it is. No extension is built at install
#    time (see above); the env vars only matter to old releases that had a build switch.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
if [ "$(installed gptqmodel)" != "$GPTQMODEL_VERSION" ]; then
    BUILD_CUDA_EXT=0 GPTQMODEL_FORCE_BUILD=0 CUDA_VISIBLE_DEVICES="" \
        "${PIP[@]}" install -c "$CONSTRAINTS" "gptqmodel==$GPTQMODEL_VERSION" safetensors
fi

# 3. Report.
"$VENV/bin/python" - <<'EOF'
from importlib.metadata import version
for name in ("torch", "transformers", "gptqmodel", "optimum", "accelerate", "torchao",
             "numpy", "safetensors"):
    try:
        print(f"{name}=={version(name)}")
    except Exception:
        print(f"{name}: not installed")
EOF
echo "peer python: $VENV/bin/python"
