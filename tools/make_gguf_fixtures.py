#!/usr/bin/env python3
"""Generate the GGUF test fixtures under tests/fixtures/gguf/ with gguf-py as the independent
reference (its numpy dequantizers are a separate implementation of ggml-quants.c).

Writes:
  dequant_<TYPE>.bin  raw ggml blocks (random bit patterns, with finite f16 scales)
  dequant_<TYPE>.f32  gguf-py's dequantization of those blocks, little-endian f32
  tiny_gemma3.gguf    a 2-layer gemma3 GGUF (GGUFWriter; F32/F16/Q8_0/Q5_0 tensors)
  tiny_gemma3.expected.json  gguf-py's dequantization of the first values of every tensor

Usage: /tmp/oracle/bin/python tools/make_gguf_fixtures.py [out_dir]
Deterministic (fixed seed): rerunning reproduces the committed files byte for byte.
"""

import json
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf import quants

OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "tests/fixtures/gguf"
OUT.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(20250101)


def finite_f16(n):
    """n random finite f16 values (normal and subnormal, both signs), as raw bytes."""
    out = []
    while len(out) < n:
        b = int(rng.integers(0, 1 << 16))
        if (b & 0x7C00) != 0x7C00:  # exclude inf / NaN
            out.append(b)
    return np.array(out, dtype=np.uint16).view(np.uint8)


def random_blocks(qtype, n_blocks, f16_offsets):
    """Random bytes for n_blocks blocks, with the f16 fields at f16_offsets made finite."""
    _, tsize = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, tsize), dtype=np.uint8)
    for off in f16_offsets:
        raw[:, off:off + 2] = finite_f16(n_blocks).reshape(n_blocks, 2)
    return raw


def write_case(name, raw, qtype):
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if qtype == T.F16:
        expected = raw.view(np.float16).astype(np.float32)
    elif qtype == T.F32:
        expected = raw.view(np.float32)
    else:
        expected = quants.dequantize(raw, qtype)
    expected = np.ascontiguousarray(expected, dtype="<f4").reshape(-1)
    (OUT / f"dequant_{name}.bin").write_bytes(raw.tobytes())
    (OUT / f"dequant_{name}.f32").write_bytes(expected.tobytes())
    print(f"dequant_{name}: {raw.size} bytes -> {expected.size} values")


# Random bit patterns exercise every quant value and every scale bit.
write_case("Q8_0", random_blocks(T.Q8_0, 4, [0]), T.Q8_0)
write_case("Q5_0", random_blocks(T.Q5_0, 4, [0]), T.Q5_0)
write_case("Q4_K", random_blocks(T.Q4_K, 2, [0, 2]), T.Q4_K)
write_case("Q6_K", random_blocks(T.Q6_K, 2, [208]), T.Q6_K)
# Plus one block each quantized from real-looking data by gguf-py's quantizer.
write_case("Q8_0_quantized", quants.quantize(rng.standard_normal((2, 32)).astype(np.float32), T.Q8_0), T.Q8_0)
write_case("Q5_0_quantized", quants.quantize(rng.standard_normal((2, 32)).astype(np.float32), T.Q5_0), T.Q5_0)
# F16: every kind of finite value plus infinities; BF16: random patterns except NaN.
f16 = np.concatenate([finite_f16(60), np.array([0x7C00, 0xFC00, 0x0001, 0x8000], dtype=np.uint16).view(np.uint8)])
write_case("F16", f16, T.F16)
bf16 = rng.integers(0, 1 << 16, size=96, dtype=np.uint16)
bf16 = bf16[(bf16 & 0x7F80) != 0x7F80][:64]
write_case("BF16", bf16.view(np.uint8), T.BF16)

# ---------------------------------------------------------------- tiny gemma3 GGUF
HIDDEN, HEADS, KV, HEAD_DIM, FFN, VOCAB, LAYERS = 32, 2, 1, 16, 64, 64, 2
path = OUT / "tiny_gemma3.gguf"
w = gguf.GGUFWriter(str(path), "gemma3")
w.add_name("tiny-gemma3-test")
w.add_context_length(1024)
w.add_embedding_length(HIDDEN)
w.add_block_count(LAYERS)
w.add_feed_forward_length(FFN)
w.add_head_count(HEADS)
w.add_head_count_kv(KV)
w.add_key_length(HEAD_DIM)
w.add_value_length(HEAD_DIM)
w.add_layer_norm_rms_eps(1e-6)
w.add_rope_freq_base(1_000_000.0)
w.add_sliding_window(8)
w.add_tokenizer_model("llama")
tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"tok{i}" for i in range(4, VOCAB)]
tokens[50] = "<end_of_turn>"
w.add_token_list(tokens)
w.add_bos_token_id(2)
w.add_eos_token_id(1)
w.add_pad_token_id(0)

expected = {}


def add(name, shape, qtype, norm=False):
    """shape in PyTorch order [rows, cols]."""
    if norm:
        data = (1.0 + 0.125 * rng.standard_normal(shape)).astype(np.float32)
    else:
        data = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    if qtype == T.F32:
        raw = data
        w.add_tensor(name, raw)
    elif qtype == T.F16:
        raw = data.astype(np.float16)
        w.add_tensor(name, raw)
    else:
        raw = quants.quantize(data, qtype)
        w.add_tensor(name, raw, raw_dtype=qtype)
    if qtype == T.F32:
        deq = raw
    elif qtype == T.F16:
        deq = raw.astype(np.float32)
    else:
        deq = quants.dequantize(raw, qtype)
    flat = np.asarray(deq, dtype=np.float32).reshape(-1)
    expected[name] = {
        "type": qtype.name,
        "shape": list(shape),
        "first": [float(x) for x in flat[:8]],
        "sum": float(flat.astype(np.float64).sum()),
    }


add("token_embd.weight", (VOCAB, HIDDEN), T.Q8_0)
add("output_norm.weight", (HIDDEN,), T.F32, norm=True)
for i in range(LAYERS):
    p = f"blk.{i}."
    add(p + "attn_norm.weight", (HIDDEN,), T.F32, norm=True)
    add(p + "attn_q.weight", (HEADS * HEAD_DIM, HIDDEN), T.F16)
    add(p + "attn_k.weight", (KV * HEAD_DIM, HIDDEN), T.Q8_0)
    add(p + "attn_v.weight", (KV * HEAD_DIM, HIDDEN), T.F32 if i == 0 else T.Q5_0)
    add(p + "attn_q_norm.weight", (HEAD_DIM,), T.F32, norm=True)
    add(p + "attn_k_norm.weight", (HEAD_DIM,), T.F32, norm=True)
    add(p + "attn_output.weight", (HIDDEN, HEADS * HEAD_DIM), T.Q8_0)
    add(p + "post_attention_norm.weight", (HIDDEN,), T.F32, norm=True)
    add(p + "ffn_norm.weight", (HIDDEN,), T.F32, norm=True)
    add(p + "ffn_gate.weight", (FFN, HIDDEN), T.Q8_0)
    add(p + "ffn_up.weight", (FFN, HIDDEN), T.F16)
    add(p + "ffn_down.weight", (HIDDEN, FFN), T.Q5_0 if i == 1 else T.Q8_0)
    add(p + "post_ffw_norm.weight", (HIDDEN,), T.F32, norm=True)

w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
(OUT / "tiny_gemma3.expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
print(f"{path.name}: {path.stat().st_size} bytes, {len(expected)} tensors")
