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
source "$(dirname "$0")/peer_venv.sh"
peer_venv llmcompressor llmcompressor "${LLMC_VERSION:-0.14.0.1}" safetensors psutil
peer_report llmcompressor torch transformers llmcompressor compressed-tensors accelerate datasets safetensors
