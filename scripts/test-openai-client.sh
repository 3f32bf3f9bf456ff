#!/usr/bin/env bash
# Drive `e4m3 serve` with the official `openai` Python client (tools/serve_openai_test.py).
# Installs `openai` from PyPI into a venv under models/.cache/openai-venv (once), starts
# `e4m3 serve --model ${E4M3_SERVE_MODEL:-models/gemma-3-270m} --backend cpu` on a free port, runs the
# checks and stops the server. Exit status 0 when every check passes; 3 when the client cannot be installed
# (no pip / no network).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/models/.cache/openai-venv"
BIN="${E4M3_BIN:-$ROOT/target/release/e4m3}"
MODEL="${E4M3_SERVE_MODEL:-$ROOT/models/gemma-3-270m}"
log() { printf '[openai-client] %s\n' "$*" >&2; }

if ! "$VENV/bin/python" -c 'import openai' 2>/dev/null; then
  log "installing the openai client into ${VENV#"$ROOT"/}"
  rm -rf "$VENV"
  if ! python3 -m venv "$VENV" >&2 || ! "$VENV/bin/python" -m pip install --disable-pip-version-check -q openai >&2; then
    log "cannot install the openai client (no python3 venv/pip or no network)"
    exit 3
  fi
fi
[[ -x "$BIN" ]] || { log "no binary at $BIN (cargo build --release first)"; exit 1; }

LOG="$(mktemp)"
"$BIN" serve --model "$MODEL" --backend cpu --port 0 --max-model-len 512 --max-num-seqs 4 \
  --served-model-name e4m3-test --api-key test-key >"$LOG" 2>&1 &
PID=$!
trap 'kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null; rm -f "$LOG"' EXIT
for _ in $(seq 1 600); do
  grep -q 'listening on http://' "$LOG" && break
  kill -0 "$PID" 2>/dev/null || { cat "$LOG" >&2; log "the server exited"; exit 1; }
  sleep 0.1
done
URL="$(grep -o 'http://[^ ]*' "$LOG" | head -1)"
[[ -n "$URL" ]] || { cat "$LOG" >&2; log "the server did not start"; exit 1; }
log "server at $URL"
"$VENV/bin/python" "$ROOT/tools/serve_openai_test.py" --base-url "$URL/v1" --api-key test-key --model e4m3-test
