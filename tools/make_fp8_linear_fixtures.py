#!/usr/bin/env python3
"""Fixtures for the FP8 linear arithmetic (tests/tests/fp8_linear.rs): an independent reference for each
scheme of ../shared/reference/fp8-formats.md, written with torch's float8_e4m3fn and float64 matmuls.

Activation quantization follows the vLLM kernels the CPU backend emulates, in f32 torch arithmetic:
  A Fp8Static   xq = e4m3(clamp(x * (1/sx), +-448))          csrc/quantization/fp8/common.cu scaled_fp8_quant_kernel
  B Fp8Dynamic  s = max(amax_row/448, 1/(448*512)); xq = e4m3(clamp(x / s))   dynamic_per_token_scaled_fp8_quant_kernel
  D Fp8Block    s = max(amax_group, 1e-10)/448;      xq = e4m3(clamp(x / s))   fp8_utils.py _per_token_group_quant_fp8
torch's cast is round-to-nearest-even but not saturating, so every cast is preceded by a clamp.
x is stored as bf16 bits (4 hex digits a value), weight and activation codes as 2 hex digits a code.
The outputs are float64: y = sum(decode(xq) * decode(wq)) * scales (per K-block for D), and for C
y = x @ (decode(wq) * S)^T. `yabs` is the same sum over |terms|, the scale of the f32 rounding error.

Run: /tmp/oracle/bin/python tools/make_fp8_linear_fixtures.py   (writes tests/fixtures/fp8-linear/cases.json)
"""

import json
import math
import os

import torch

F8 = torch.float8_e4m3fn
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "fp8-linear", "cases.json")


def e4m3(v32):
    """f32 tensor -> uint8 codes: clamp, then torch's RNE cast."""
    assert v32.dtype == torch.float32
    return v32.clamp(-448.0, 448.0).to(F8).view(torch.uint8)


def dec64(codes):
    return codes.view(F8).to(torch.float64)


def bf16_exact(shape, gen, std=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * std).to(torch.bfloat16).to(torch.float32)


def bf16_range(lo_bits, hi_bits):
    return torch.arange(lo_bits, hi_bits, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).to(torch.float32)


def plant_static(x, row, col, sx):
    """Put into x[row, col] a bf16 value v for which v/sx and v*(1/sx) round to different E4M3 codes, so
    the fixture tells the kernel's multiply by the reciprocal from a division. Returns v."""
    v = bf16_range(0x3E00, 0x4100)  # 0.125 .. 8
    hit = v[e4m3(v / sx) != e4m3(v * (1.0 / sx))]
    assert len(hit) > 0, f"no bf16 value separates x/sx from x*(1/sx) for sx = {float(sx)}"
    x[row, col] = hit[0]
    return float(hit[0])


def separating_pairs():
    """(v, amax) bf16 pairs with v < amax where, for s = amax/448, v/s and v*(1/s) round to different
    E4M3 codes (the dynamic kernels divide)."""
    v, a = bf16_range(0x3E00, 0x4100)[:, None], bf16_range(0x3F80, 0x4100)[None, :]
    s = a / 448.0
    vv, ss = v.expand(-1, a.shape[1]), s.expand(v.shape[0], -1)
    hit = ((vv < a) & (e4m3(vv / ss) != e4m3(vv * (1.0 / ss)))).nonzero()
    assert len(hit) > 0
    return [(float(v[i, 0]), float(a[0, j])) for i, j in hit.tolist()]


PAIRS = separating_pairs()


def plant_dynamic(x, row, lo, hi, which):
    """Make x[row, lo:hi] have amax `a` (at lo) and hold `v` (at lo+1) for a separating pair (v, a)."""
    v, a = PAIRS[which % len(PAIRS)]
    x[row, lo:hi] = x[row, lo:hi].clamp(-a, a)
    x[row, lo], x[row, lo + 1] = a, -v


def quant_weight_per_tensor(w):
    sw = (w.abs().max() / 448.0).to(torch.float32)
    return e4m3(w / sw), sw


def quant_weight_per_channel(w, dtype):
    sw = (w.abs().amax(dim=1, keepdim=True) / 448.0).to(dtype).to(torch.float32)
    return e4m3(w / sw), sw


def quant_weight_blocks(w, block):
    n, k = w.shape
    bo, bi = block
    ob, ib = math.ceil(n / bo), math.ceil(k / bi)
    s = torch.empty(ob, ib, dtype=torch.float32)
    codes = torch.empty(n, k, dtype=torch.uint8)
    for i in range(ob):
        for j in range(ib):
            blk = w[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi]
            a = blk.abs().max()
            s[i, j] = a / 448.0 if a > 0 else 1.0
            codes[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi] = e4m3(blk / s[i, j])
    return codes, s


def expand(s, block, n, k):
    return s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:n, :k].to(torch.float64)


def hexcodes(c):
    return bytes(c.flatten().tolist()).hex()


def bf16hex(x):
    """bf16-exact f32 values as 4 hex digits (the bf16 bits) each."""
    b = x.to(torch.bfloat16)
    assert torch.equal(b.to(torch.float32), x)
    return "".join(f"{v & 0xFFFF:04x}" for v in b.view(torch.int16).flatten().tolist())


def floats(t):
    return [float(v) for v in t.flatten().tolist()]


def case_static(name, gen, t, n, k, sx, big=None):
    x = bf16_exact((t, k), gen)
    if big is not None:
        x[0, 0], x[-1, -1] = big, -big  # clamp to +-448 after x * (1/sx)
    w = bf16_exact((n, k), gen, 0.05)
    wq, sw = quant_weight_per_tensor(w)
    sx = torch.tensor(sx, dtype=torch.float32)
    if math.frexp(float(sx))[0] != 0.5:  # a power of two has an exact reciprocal: nothing to separate
        plant_static(x, 0, 1, sx)
    xq = e4m3(x * (1.0 / sx))
    acc = dec64(xq) @ dec64(wq).T
    accabs = dec64(xq).abs() @ dec64(wq).abs().T
    f = float(sx) * float(sw)
    return dict(name=name, scheme="static", t=t, n=n, k=k, x=bf16hex(x), w=hexcodes(wq),
                weight_scale=dict(dtype="F32", shape=[], values=[float(sw)]),
                input_scale=dict(dtype="F32", shape=[1], values=[float(sx)]),
                act_scales=[float(sx)], act_codes=hexcodes(xq),
                y=floats(acc * f), yabs=floats(accabs * abs(f)))


def case_dynamic(name, gen, t, n, k, sw_dtype, zero_row=None, tiny_row=None, huge_row=None):
    x = bf16_exact((t, k), gen)
    if zero_row is not None:
        x[zero_row] = 0.0
    if tiny_row is not None:
        x[tiny_row] *= 2.0 ** -14  # amax/448 below 1/(448*512): the floor applies
    if huge_row is not None:
        x[huge_row] *= 4096.0
    plant_dynamic(x, 0, 0, k, 0)
    w = bf16_exact((n, k), gen, 0.05)
    dt = {"BF16": torch.bfloat16, "F32": torch.float32}[sw_dtype]
    wq, sw = quant_weight_per_channel(w, dt)
    amax = x.abs().amax(dim=1, keepdim=True)
    s = torch.maximum(amax / 448.0, torch.tensor(1.0 / (448.0 * 512.0), dtype=torch.float32))
    xq = e4m3(x / s)
    s64, sw64 = s.to(torch.float64), sw.to(torch.float64).T
    y = (dec64(xq) @ dec64(wq).T) * s64 * sw64
    yabs = (dec64(xq).abs() @ dec64(wq).abs().T) * s64 * sw64.abs()
    return dict(name=name, scheme="dynamic", t=t, n=n, k=k, x=bf16hex(x), w=hexcodes(wq),
                weight_scale=dict(dtype=sw_dtype, shape=[n, 1], values=floats(sw)),
                act_scales=floats(s), act_codes=hexcodes(xq), y=floats(y), yabs=floats(yabs))


def case_block_wo(name, gen, t, n, k, block, four_d):
    x = bf16_exact((t, k), gen)
    w = bf16_exact((n, k), gen, 0.05)
    w[:, :block[1]] *= 8.0  # blocks of different magnitude
    wq, s = quant_weight_blocks(w, block)
    wd = dec64(wq) * expand(s, block, n, k)
    x64 = x.to(torch.float64)
    ob, ib = s.shape
    shape = [ob, 1, ib, 1] if four_d else [ob, ib]
    return dict(name=name, scheme="block_wo", block=list(block), t=t, n=n, k=k, x=bf16hex(x), w=hexcodes(wq),
                weight_scale=dict(dtype="F32", shape=shape, values=floats(s)),
                y=floats(x64 @ wd.T), yabs=floats(x64.abs() @ wd.abs().T))


def case_block(name, gen, t, n, k, block, zero_group=None, zero_row=None):
    x = bf16_exact((t, k), gen)
    if zero_group is not None:
        r, g = zero_group
        x[r, g * block[1]:(g + 1) * block[1]] = 0.0
    if zero_row is not None:
        x[zero_row] = 0.0
    x[0, -1] = 300.0  # a large value in the last (partial) group
    plant_dynamic(x, 0, 0, block[1], k)
    w = bf16_exact((n, k), gen, 0.05)
    wq, sinv = quant_weight_blocks(w, block)
    bi = block[1]
    groups = math.ceil(k / bi)
    scales = torch.empty(t, groups, dtype=torch.float32)
    xq = torch.empty(t, k, dtype=torch.uint8)
    for g in range(groups):
        xg = x[:, g * bi:(g + 1) * bi]
        a = torch.maximum(xg.abs().amax(dim=1), torch.tensor(1e-10, dtype=torch.float32))
        sg = a / 448.0
        scales[:, g] = sg
        xq[:, g * bi:(g + 1) * bi] = e4m3(xg / sg[:, None])
    sw = sinv.repeat_interleave(block[0], 0)[:n].to(torch.float64)  # [n, groups]
    y = torch.zeros(t, n, dtype=torch.float64)
    yabs = torch.zeros(t, n, dtype=torch.float64)
    for g in range(groups):
        sl = slice(g * bi, (g + 1) * bi)
        a, b = dec64(xq[:, sl]), dec64(wq[:, sl])
        f = scales[:, g].to(torch.float64)[:, None] * sw[:, g][None, :]
        y += (a @ b.T) * f
        yabs += (a.abs() @ b.abs().T) * f.abs()
    assert not torch.isnan(y).any()
    return dict(name=name, scheme="block", block=list(block), t=t, n=n, k=k, x=bf16hex(x), w=hexcodes(wq),
                weight_scale=dict(dtype="F32", shape=list(sinv.shape), values=floats(sinv)),
                act_scales=floats(scales), act_codes=hexcodes(xq), y=floats(y), yabs=floats(yabs))


def main():
    gen = torch.Generator().manual_seed(20261122)
    cases = [
        case_static("static_k13_n7_clamp", gen, 3, 7, 13, 0.0078125, big=40.0),
        case_static("static_k64_n16", gen, 4, 16, 64, 0.0398065447807312),
        case_dynamic("dynamic_k13_n7_bf16_zero_tiny_huge", gen, 5, 7, 13, "BF16", zero_row=1, tiny_row=2,
                     huge_row=3),
        case_dynamic("dynamic_k200_n9_f32", gen, 3, 9, 200, "F32"),
        case_block_wo("block_wo_k200_n7_b128_4d", gen, 3, 7, 200, (128, 128), True),
        case_block_wo("block_wo_k40_n20_b8x16_2d", gen, 2, 20, 40, (8, 16), False),
        case_block("block_k200_n7_b128", gen, 4, 7, 200, (128, 128), zero_group=(1, 1), zero_row=3),
        case_block("block_k130_n70_b64", gen, 3, 70, 130, (64, 64), zero_group=(2, 0)),
        case_block("block_k72_n20_b16x32", gen, 2, 20, 72, (16, 32), zero_group=(1, 2)),
    ]
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump({"torch": torch.__version__, "cases": cases}, f, separators=(",", ":"))
    print(f"wrote {OUT}: {os.path.getsize(OUT)} bytes, {len(cases)} cases")


if __name__ == "__main__":
    main()
