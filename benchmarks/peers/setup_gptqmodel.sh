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
# GPTQModel is published as an sdist only, but its setup.py builds no extension: its CUDA/C++
# kernels are compiled just in time for the backends that need them, and the TORCH backend is
# pure PyTorch. Override the versions with GPTQMODEL_VERSION / TORCH_VERSION.
source "$(dirname "$0")/peer_venv.sh"
# No extension is built at install time; the variables only matter to old releases with a build switch.
export BUILD_CUDA_EXT=0 GPTQMODEL_FORCE_BUILD=0 CUDA_VISIBLE_DEVICES=""
peer_venv gptqmodel gptqmodel "${GPTQMODEL_VERSION:-7.6.0}" safetensors
peer_report gptqmodel torch transformers gptqmodel optimum accelerate torchao numpy safetensors
