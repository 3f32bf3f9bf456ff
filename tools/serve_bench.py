#!/usr/bin/env python3
"""Serving benchmark in the shape of SPEED-Bench: N users stream chat completions from an
OpenAI-compatible server (e4m3 serve, vllm serve, ...) at each concurrency; TTFT, inter-token latency and
tokens/s per user and in aggregate. Standard library only.

    python3 tools/serve_bench.py --url http://127.0.0.1:8000 --model NAME [--concurrency 1,32]
        [--requests-per-user 2] [--max-tokens 64] [--prompt-words 32,256] [--api-key KEY] [--out FILE]

Each request is a chat completion with `stream: true`, greedy (temperature 0), `ignore_eos`-free: the
completion may end early at an EOS token, and tokens are counted from the streamed chunks (one content
delta per token as e4m3 and vLLM send them) or from the final usage when the server reports it
(`stream_options.include_usage`). Prompts are made of the words of a fixed public-domain-like text,
`--prompt-words` long, cycling through the given lengths.
"""

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse

WORDS = (
    "the quick brown fox jumps over the lazy dog while a river runs past old stone houses and the wind "
    "carries the sound of bells from a distant tower where people gather each morning to trade bread fish "
    "and stories about the sea"
).split()


def prompt(n_words, salt):
    return " ".join(WORDS[(i * 7 + salt) % len(WORDS)] for i in range(n_words))


def one_request(url, model, text, max_tokens, api_key):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=600)
    body = json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    })
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, headers)
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    times, usage = [], None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            usage = chunk["usage"]
        for ch in chunk.get("choices", []):
            if ch.get("delta", {}).get("content"):
                times.append(time.perf_counter())
    end = time.perf_counter()
    conn.close()
    tokens = usage["completion_tokens"] if usage else len(times)
    ttft = (times[0] - t0) if times else end - t0
    itl = [b - a for a, b in zip(times, times[1:])]
    return {"ttft": ttft, "itl": itl, "tokens": tokens, "secs": end - t0}


def run_level(args, conc):
    results, errors = [], []
    lens = args.prompt_words

    def user(uid):
        for r in range(args.requests_per_user):
            text = prompt(lens[(uid + r) % len(lens)], uid * 31 + r)
            try:
                results.append(one_request(args.url, args.model, text, args.max_tokens, args.api_key))
            except Exception as e:  # noqa: BLE001 - reported, not hidden
                errors.append(str(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=user, args=(u,)) for u in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    itl = [x for r in results for x in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    q = lambda v, p: statistics.quantiles(v, n=100)[p - 1] if len(v) >= 2 else (v[0] if v else None)
    return {
        "concurrency": conc,
        "requests": len(results),
        "errors": errors,
        "ttft_ms_p50": 1e3 * statistics.median([r["ttft"] for r in results]) if results else None,
        "ttft_ms_p90": 1e3 * q([r["ttft"] for r in results], 90) if results else None,
        "itl_ms_p50": 1e3 * statistics.median(itl) if itl else None,
        "itl_ms_p90": 1e3 * q(itl, 90) if itl else None,
        "tok_per_s_per_user": statistics.median([r["tokens"] / r["secs"] for r in results]) if results else None,
        "tok_per_s_aggregate": tokens / wall,
        "wall_secs": wall,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--requests-per-user", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", default="32,256")
    ap.add_argument("--api-key")
    ap.add_argument("--out")
    args = ap.parse_args()
    args.prompt_words = [int(x) for x in args.prompt_words.split(",")]
    levels = [run_level(args, int(c)) for c in args.concurrency.split(",")]
    report = {"url": args.url, "model": args.model, "max_tokens": args.max_tokens,
              "prompt_words": args.prompt_words, "levels": levels}
    print(f"{'conc':>5} {'reqs':>5} {'TTFT p50 ms':>12} {'ITL p50 ms':>11} {'tok/s/user':>11} {'tok/s all':>10} errors")
    for l in levels:
        f = lambda x: f"{x:.1f}" if x is not None else "-"
        print(f"{l['concurrency']:>5} {l['requests']:>5} {f(l['ttft_ms_p50']):>12} {f(l['itl_ms_p50']):>11} "
              f"{f(l['tok_per_s_per_user']):>11} {f(l['tok_per_s_aggregate']):>10} {len(l['errors'])}")
    if args.out:
        json.dump(report, open(args.out, "w"), indent=1)
    sys.exit(1 if any(l["errors"] for l in levels) else 0)


if __name__ == "__main__":
    main()
