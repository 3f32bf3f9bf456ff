#!/usr/bin/env bash
# The whole test suite: sets up what it needs (model, tokenizer, release build), then runs every test of
# the workspace, including the golden test on the real Gemma 3 270M.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup.sh
# NVRTC (fetched by setup) for the kernel compile check; CUDA GPU tests report "ignored" without a GPU.
export LD_LIBRARY_PATH="$ROOT/models/.cache/nvrtc/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cargo test --release --workspace
