#!/usr/bin/env python3
"""Side by side: an `e4m3 bench --json` report and a peer's (tools/hf_peer_bench.py, same JSON shape).

    python3 tools/bench_compare.py E4M3_JSON PEER_JSON [--out FILE.md] [--json FILE.json]

Each file holds one JSON object (the last line that parses as one, so a captured log works too). Points
are matched by prompt length (TTFT) and batch size (decode ITL p50/p90, tok/s); a point only one side
measured shows `-`. The speedup column is e4m3's: peer time / e4m3 time for latencies, e4m3 tok/s /
peer tok/s for throughput; above 1 means e4m3 is faster. Standard library only.
"""

import argparse
import json
import sys


def load(path):
    text = open(path).read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        for line in reversed(text.splitlines()):
            line = line.strip()
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    pass
    sys.exit(f"{path}: no JSON object found")


def describe(r):
    parts = [str(r.get("tool", "?")), str(r.get("model", "?")), str(r.get("scheme", "?"))]
    for k in ("backend", "device", "commit", "transformers_version", "cache", "date"):
        if r.get(k):
            parts.append(f"{k} {r[k]}")
    if r.get("error"):
        parts.append(f"ERROR {r['error']}")
    return ", ".join(parts)


def rows(e, p):
    """(label, unit, e4m3 value, peer value, higher_is_better) for every point either side has."""
    out = []
    ep = {x["prompt_len"]: x for x in e.get("prefill", [])}
    pp = {x["prompt_len"]: x for x in p.get("prefill", [])}
    for L in sorted(set(ep) | set(pp)):
        out.append((f"TTFT prompt {L}", "ms", ep.get(L, {}).get("ttft_ms"), pp.get(L, {}).get("ttft_ms"), False))
    ed = {x["batch"]: x for x in e.get("decode", [])}
    pd = {x["batch"]: x for x in p.get("decode", [])}
    for B in sorted(set(ed) | set(pd)):
        a, b = ed.get(B, {}), pd.get(B, {})
        out.append((f"ITL p50 batch {B}", "ms", a.get("itl_ms_p50"), b.get("itl_ms_p50"), False))
        out.append((f"ITL p90 batch {B}", "ms", a.get("itl_ms_p90"), b.get("itl_ms_p90"), False))
        out.append((f"decode batch {B}", "tok/s", a.get("tok_per_s"), b.get("tok_per_s"), True))
    return out


def speedup(ev, pv, higher):
    if ev is None or pv is None or ev <= 0 or pv <= 0:
        return None
    return ev / pv if higher else pv / ev


def fmt(v):
    if v is None:
        return "-"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("e4m3")
    ap.add_argument("peer")
    ap.add_argument("--out", help="write the table as Markdown here")
    ap.add_argument("--json", help="write the rows as JSON here")
    a = ap.parse_args()
    e, p = load(a.e4m3), load(a.peer)
    table = rows(e, p)
    lines = [
        f"e4m3: {describe(e)}",
        f"peer: {describe(p)}",
        "",
        "| point | unit | e4m3 | peer | e4m3 speedup |",
        "|---|---|---|---|---|",
    ]
    out_rows = []
    for label, unit, ev, pv, higher in table:
        s = speedup(ev, pv, higher)
        lines.append(f"| {label} | {unit} | {fmt(ev)} | {fmt(pv)} | {'-' if s is None else f'{s:.2f}x'} |")
        out_rows.append({"point": label, "unit": unit, "e4m3": ev, "peer": pv, "e4m3_speedup": s})
    for k, r in (("e4m3", e), ("peer", p)):
        dev = (r.get("memory") or {}).get("device")
        if dev:
            lines.append(f"\n{k} device memory: peak {dev.get('peak_bytes', 0) / 1e9:.2f} GB of {dev.get('total_bytes', 0) / 1e9:.1f} GB")
    bw = e.get("bandwidth") or {}
    if bw.get("floor_itl_ms") is not None:
        lines.append(
            f"e4m3 batch-1 bandwidth floor {bw['floor_itl_ms']:.3f} ms; ITL / floor {fmt(bw.get('itl_over_floor'))}"
        )
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"e4m3": describe(e), "peer": describe(p), "rows": out_rows}, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
