#!/usr/bin/env bash
# NVRTC from PyPI (nvidia-cuda-nvrtc 13.0, headers from nvidia-cuda-runtime 13.0) into models/.cache/nvrtc,
# so the CUDA kernels are compile-checked on machines without a GPU or CUDA toolkit. Prints nothing else;
# use it with: export LD_LIBRARY_PATH="$ROOT/models/.cache/nvrtc/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$ROOT/models/.cache/nvrtc"
log() { printf '[nvrtc] %s\n' "$*" >&2; }
if compgen -G "$DIR/nvidia/cu13/lib/libnvrtc.so.13*" >/dev/null && [[ -f "$DIR/nvidia/cu13/include/cuda_fp8.h" ]]; then
  log "NVRTC already present: ${DIR#"$ROOT"/}"
  exit 0
fi
mkdir -p "$DIR/wheels"
log "downloading nvidia-cuda-nvrtc==13.0.* and nvidia-cuda-runtime==13.0.* from PyPI"
python3 -m pip download --no-deps --disable-pip-version-check -q --only-binary=:all: \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_12_x86_64 \
  --platform manylinux2010_x86_64 --python-version 3.12 \
  -d "$DIR/wheels" "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-runtime==13.0.*"
python3 - "$DIR" <<'PY'
import sys, zipfile, glob, os
d = sys.argv[1]
for w in glob.glob(os.path.join(d, "wheels", "*.whl")):
    with zipfile.ZipFile(w) as z:
        z.extractall(d)
PY
rm -rf "$DIR/wheels"
ls "$DIR"/nvidia/cu13/lib/libnvrtc.so.13* >/dev/null
log "NVRTC ready in ${DIR#"$ROOT"/}/nvidia/cu13/lib"
