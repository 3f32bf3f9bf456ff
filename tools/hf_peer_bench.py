#!/usr/bin/env python3
"""The HF transformers peer of `e4m3 bench`: the same measurements on the same checkpoint directory.

    python3 tools/hf_peer_bench.py --model DIR [--prompt-lens 128,1024] [--batches 1,8,32,64] [--decode 32]
        [--decode-context N] [--runs 1] [--warmup 1] [--cache dynamic|static] [--attn sdpa|eager]
        [--out FILE]

DIR is a directory e4m3 reads: the BF16 checkpoint `e4m3 import-gguf` writes (config.json,
model.safetensors, tokenizer files) or an FP8 one `e4m3 quantize` writes. `--scheme fp8-block` is
transformers' own FineGrainedFP8 format (`quant_method: fp8`); the other FP8 formats need loaders
transformers may lack (ModelOpt) or extra packages (compressed-tensors). When the model cannot be loaded or
run, the JSON holds `"error"` with the reason and the exit status is 3.

Needs torch and transformers and one CUDA GPU; no network (files are read with local_files_only).

What is measured, as `e4m3 bench` does (greedy, batch of equal-length rows, no padding):
  * TTFT per prompt length L: `generate(max_new_tokens=1)` on one row of L tokens, from the call until the
    first token's logits exist (torch.cuda.synchronize() in a logits processor).
  * decode at batch B: B rows of `--decode-context` tokens (each its own slice of the token stream, BOS
    first), `generate(min_new_tokens = max_new_tokens = decode + 1)`; the time between consecutive logits
    processor calls (each after torch.cuda.synchronize()) is one decode step, the inter-token latency.
    Throughput is B x decode / (sum of the step times).
  * `--cache dynamic` (default) is transformers' DynamicCache, eager; `--cache static` uses
    `cache_implementation="static"`, with which generate() compiles the forward (torch.compile) where it
    can: warm-up repetitions absorb the compilation, each new shape compiles again.
  * memory: torch.cuda.max_memory_allocated() and the device total; host peak RSS.

The JSON has the shape of `e4m3 bench --json` (`prefill` and `decode` lists with the same keys), so
`tools/bench_compare.py E4M3_JSON PEER_JSON` can put the two side by side.
"""

import argparse
import datetime
import json
import os
import resource
import socket
import statistics
import sys
import time
import traceback

# The fixed English text `e4m3 bench` prefills (cli/src/bench.rs TEXT).
TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable metal type "
    "made it possible to copy books quickly and cheaply. Within a few decades printers worked in most of the large "
    "cities of Europe, and the number of books in circulation grew from thousands to millions. "
)


def int_list(s):
    try:
        v = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")
    if not v or any(x < 1 for x in v):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return sorted(set(v))


def percentile(v, q):
    s = sorted(v)
    return s[round((len(s) - 1) * q)] if s else float("nan")


def scheme_of(model_dir):
    """The scheme label e4m3 uses for the checkpoint, from its config files."""
    try:
        cfg = json.load(open(os.path.join(model_dir, "config.json")))
    except Exception:
        return "unknown"
    qc = cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config")
    if not qc:
        return str(cfg.get("torch_dtype") or cfg.get("dtype") or "bf16").replace("bfloat16", "bf16")
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":
        return "fp8-block"
    if method == "compressed-tensors":
        return "fp8-dynamic"
    if method == "modelopt":
        return "fp8-block-wo" if str(qc.get("quant_algo", "")).upper() == "FP8_PB_WO" else "fp8-static"
    return method or "unknown"


def token_stream(model_dir, length, vocab):
    """Token ids of TEXT repeated (BOS first), or fixed pseudo-random ids when there is no tokenizer."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        ids = tok(TEXT, add_special_tokens=True)["input_ids"]
        more = tok(TEXT, add_special_tokens=False)["input_ids"]
        while len(ids) < length:
            ids += more
        return ids[:length], "text"
    except Exception as e:  # no tokenizer files, or one transformers cannot read
        print(f"tokenizer not usable ({type(e).__name__}: {e}); random ids", file=sys.stderr)
        import random

        rng = random.Random(1)
        return [2] + [rng.randrange(3, vocab) for _ in range(length - 1)], "random ids"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (the one e4m3 reads)")
    ap.add_argument("--prompt-lens", type=int_list, default=[128, 1024])
    ap.add_argument("--batches", type=int_list, default=[1, 8, 32, 64])
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--decode-context", type=int, default=None, help="default: the shortest prompt length")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--cache", choices=["dynamic", "static"], default="dynamic")
    ap.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, ...)")
    ap.add_argument("--out", help="also write the JSON here")
    a = ap.parse_args()
    if a.decode < 1 or a.runs < 1 or a.warmup < 0:
        ap.error("--decode and --runs must be at least 1, --warmup at least 0")
    context = a.decode_context or a.prompt_lens[0]

    report = {
        "tool": "transformers",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": socket.gethostname(),
        "model": a.model,
        "source": "checkpoint",
        "scheme": scheme_of(a.model),
        "cache": a.cache,
        "attn_implementation": a.attn,
        "runs": a.runs,
        "warmup": a.warmup,
        "decode_steps": a.decode,
        "decode_context": context,
        "prefill": [],
        "decode": [],
        "error": None,
    }

    def finish(code):
        s = json.dumps(report)
        print(s)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(report, f, indent=1)
                f.write("\n")
        sys.exit(code)

    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList
    except Exception as e:
        report["error"] = f"importing torch/transformers: {type(e).__name__}: {e}"
        finish(3)
    report["torch_version"] = torch.__version__
    report["transformers_version"] = transformers.__version__
    if not torch.cuda.is_available():
        report["error"] = "no CUDA device visible to torch"
        finish(3)
    dev = torch.device("cuda")
    report["backend"] = "cuda"
    report["device"] = torch.cuda.get_device_name(dev)

    class StepTimer(LogitsProcessor):
        """Records the time each step's logits exist (after a device synchronize)."""

        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            return scores

    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            a.model,
            dtype=torch.bfloat16,
            device_map="cuda",
            attn_implementation=a.attn,
            local_files_only=True,
        )
        model.eval()
    except Exception as e:
        report["error"] = f"loading: {type(e).__name__}: {e}"
        traceback.print_exc()
        finish(3)
    torch.cuda.synchronize()
    report["load_secs"] = time.perf_counter() - t0
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    report["quantization"] = type(getattr(model, "hf_quantizer", None)).__name__ if getattr(model, "hf_quantizer", None) else "none"
    report["layers"] = cfg.num_hidden_layers
    report["hidden_size"] = cfg.hidden_size
    report["vocab_size"] = cfg.vocab_size
    report["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    # The checkpoint's generation_config may name a cache ("hybrid"); use the one asked for.
    model.generation_config.cache_implementation = "static" if a.cache == "static" else None
    longest = a.prompt_lens[-1]
    stream, report["prompt_source"] = token_stream(a.model, max(longest, context + a.batches[-1]), cfg.vocab_size)

    def run(rows, new_tokens):
        """generate() on `rows` (lists of ids); the times of every step's logits, relative to the call."""
        ids = torch.tensor(rows, dtype=torch.long, device=dev)
        timer = StepTimer()
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=0,
                logits_processor=LogitsProcessorList([timer]),
            )
        torch.cuda.synchronize()
        if out.shape[1] != ids.shape[1] + new_tokens:
            raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} tokens, expected {new_tokens}")
        return [t - start for t in timer.times]

    try:
        for L in a.prompt_lens:
            ttft = []
            for rep in range(a.warmup + a.runs):
                times = run([stream[:L]], 1)
                if rep >= a.warmup:
                    ttft.append(times[0])
            m = statistics.median(ttft)
            report["prefill"].append(
                {"prompt_len": L, "ttft_ms": m * 1e3, "ttft_ms_min": min(ttft) * 1e3, "tok_per_s": L / m}
            )
            print(f"prefill {L}: TTFT {m * 1e3:.2f} ms", file=sys.stderr)
        for B in a.batches:
            rows = [[stream[0]] + stream[1 + i : i + context] for i in range(B)]
            itl, totals = [], []
            for rep in range(a.warmup + a.runs):
                times = run(rows, a.decode + 1)
                steps = [later - earlier for earlier, later in zip(times, times[1:])]
                if rep >= a.warmup:
                    itl += steps
                    totals.append(sum(steps))
            tps = B * a.decode / statistics.median(totals)
            report["decode"].append(
                {
                    "batch": B,
                    "context": context,
                    "steps": a.decode,
                    "itl_ms_p50": percentile(itl, 0.5) * 1e3,
                    "itl_ms_p90": percentile(itl, 0.9) * 1e3,
                    "itl_ms_mean": sum(itl) / len(itl) * 1e3,
                    "tok_per_s": tps,
                }
            )
            print(f"decode batch {B}: ITL p50 {percentile(itl, 0.5) * 1e3:.2f} ms, {tps:.1f} tok/s", file=sys.stderr)
    except Exception as e:
        report["error"] = f"running: {type(e).__name__}: {e}"
        traceback.print_exc()
    free, total = torch.cuda.mem_get_info(dev)
    report["memory"] = {
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device": {
            "in_use_bytes": torch.cuda.memory_allocated(dev),
            "peak_bytes": torch.cuda.max_memory_allocated(dev),
            "total_bytes": total,
        },
    }
    finish(3 if report["error"] else 0)


if __name__ == "__main__":
    main()
