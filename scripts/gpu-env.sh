#!/usr/bin/env bash
# Source it: puts the CUDA libraries (driver, NVRTC, cuBLASLt) of a GPU machine on LD_LIBRARY_PATH, from the
# toolkit and from pip's NVIDIA wheels (PyTorch's), for the dynamically loaded CUDA backend.
# CUDA libraries: the toolkit's, then pip's (PyTorch's) NVIDIA wheels.
libdirs=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu)
if command -v python3 >/dev/null; then
  while IFS= read -r d; do libdirs+=("$d"); done < <(python3 - <<'PY' 2>/dev/null
import glob, os, site, sys
roots = set(site.getsitepackages() + [site.getusersitepackages()] + sys.path)
for r in roots:
    for d in glob.glob(os.path.join(r, "nvidia", "*", "lib")) + glob.glob(os.path.join(r, "nvidia", "cu13", "lib")):
        print(d)
PY
)
fi
for d in "${libdirs[@]}"; do [[ -d "$d" ]] && LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; done
export LD_LIBRARY_PATH

