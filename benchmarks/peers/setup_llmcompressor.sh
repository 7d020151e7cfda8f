#!/usr/bin/env bash
# Create (idempotently) the virtual environment that runs llm-compressor, the peer tool of the
# GPTQ side-by-side benchmark. It is kept apart from the project's own environment because
# llm-compressor pins versions of transformers and compressed-tensors that differ from ours.
#
#   bash benchmarks/peers/setup_llmcompressor.sh
#   "${HFCOMPRESS_BENCH_HOME:-$HOME/.cache/hfcompress-bench}/llmcompressor-venv/bin/python" \
#       benchmarks/peers/llmcompressor_gptq.py --model DIR --windows FILE --output DIR --json FILE
#
# Pins (llmcompressor 0.14.0.1 declares, in its wheel metadata):
#   torch >=2.10.0,<=2.14.0        -> torch 2.13.0 (the CPU wheel) fits, no conflict
#   transformers >=5.15.0,<=5.17.0 -> pip resolves 5.17.0 (our project venv has 5.24; the peer
#                                     cannot use it, hence the separate venv)
#   compressed-tensors ==0.19.0    -> exactly 0.19.0
#   auto-round >=0.14.1,<=0.15.1, accelerate >=1.15.0, datasets >=4.8.4, nvidia-ml-py (pure Python)
# torch is installed FIRST and then held by a constraint, so that no later step replaces the CPU
# wheel with a multi-GB CUDA build. Override the versions with LLMC_VERSION / TORCH_VERSION.
set -euo pipefail

BENCH_HOME="${HFCOMPRESS_BENCH_HOME:-$HOME/.cache/hfcompress-bench}"
VENV="$BENCH_HOME/llmcompressor-venv"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
LLMC_VERSION="${LLMC_VERSION:-0.14.0.1}"

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

# 2. llm-compressor and its pins, with torch held where it is.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
if [ "$(installed llmcompressor)" != "$LLMC_VERSION" ]; then
    "${PIP[@]}" install -c "$CONSTRAINTS" "llmcompressor==$LLMC_VERSION" safetensors psutil
fi

# 3. Report.
"$VENV/bin/python" - <<'EOF'
from importlib.metadata import version
for name in ("torch", "transformers", "llmcompressor", "compressed-tensors",
             "accelerate", "datasets", "safetensors"):
    try:
        print(f"{name}=={version(name)}")
    except Exception:
        print(f"{name}: not installed")
EOF
echo "peer python: $VENV/bin/python"
