#!/usr/bin/env python3
"""Generate tests/fixtures/golden-270m.json: reference logits for Gemma 3 270M.

Oracle: PyPI torch + transformers on CPU (versions pinned in
tools/requirements-oracle.txt). The model is the Q4_K_M GGUF fetched by
scripts/fetch-model.sh, loaded with transformers' GGUF loader (which
dequantizes every tensor to f32 with gguf-py), then every parameter is rounded
to bf16 (and back to f32) so that the oracle sees exactly the weights our
runtime's BF16 import produces. The embedding scale is sqrt(640) rounded to
bf16 (25.25), as in a bf16 checkpoint. Eager attention, f32 compute.

Usage (from anywhere):
    /tmp/oracle/bin/python tools/make_golden.py [--gguf PATH] [--tokenizer DIR] [--out PATH]

The script verifies (and prints) that:
  * transformers subtracted the +1.0 that llama.cpp's converter adds to every
    Gemma `*norm.weight` (loaded == raw GGUF - 1, bit-exact in f32);
  * the loaded config matches the real Gemma 3 270M architecture (fields that
    the GGUF does not carry come from Gemma3TextConfig defaults; they are
    checked and forced to the right values).
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

N_TOP = 8
N_GREEDY = 32
PROBE_SEED = 20250301

SHORT_CASES = [
    ("fact", "The capital of France is Paris, and the capital of Germany is"),
    ("list_code", "Here is a Python function that returns the sum of a list of numbers:\n\ndef"),
    ("question", "Question: Why is the sky blue during the day but red at sunset?\nAnswer:"),
]

# Original English prose written for this fixture (no copyright concerns).
# It must tokenize to > 600 tokens so the 512-token sliding window is exercised.
LONG_PROMPT = """\
The lighthouse at the end of the northern breakwater had not been lit for eleven years when Margaret Hale came back to the village. \
She arrived on the last bus of the evening, carrying a single leather suitcase and a bundle of letters tied with green string, \
and the driver, who remembered her father, refused to take her fare. The harbour was smaller than she remembered. The boats \
that had once crowded against the quay, three deep on a good morning, were reduced to a handful of painted dinghies and one \
rusting trawler whose name had been worn away by salt and neglect. Gulls stood on the bollards in a long grey line, each of them \
facing into the wind, as if they were waiting for an announcement that would never come.

She took a room above the bakery on Chapel Street. The baker's wife, a broad and cheerful woman named Agnes Pryce, asked no \
questions on the first night, but on the second morning, as she set down a plate of warm bread and a pot of strong tea, she \
said that everyone in the village already knew who Margaret was and why she had come. "You want to know what happened to the \
light," Agnes said. "Your father kept it for thirty years, and then one winter it went dark, and the council said it was too \
expensive to repair. That is the story people will tell you. It is not the whole story."

Margaret spent the following week walking. She walked along the cliffs to the old signal station, where the wind pressed the \
grass flat against the ground and the sea below was the colour of slate. She walked inland, past the chapel and the school \
and the row of cottages where the fishermen's widows had lived, to the reservoir that supplied the village with water. She \
walked the length of the breakwater every evening at dusk and stood at the foot of the lighthouse, looking up at the dark \
lantern room, trying to remember what it had looked like when the great lamp turned and the beam swept across the water \
every twelve seconds, steady as a heartbeat.

The letters in her suitcase had been written by her father during the last two years of his life. He had never posted them. \
She had found them in a biscuit tin at the back of his wardrobe, after the funeral, each one addressed to her in his careful, \
old-fashioned handwriting. Most of them were short and said very little: the weather, the price of coal, a ship that had \
passed close to the rocks in fog. But the last letter was different. It was four pages long, and in it he described a \
meeting at the village hall, a disagreement with a man from the shipping company, and a promise he had made to someone he \
did not name. "If the light goes out," he had written, "it will not be because the lamp has failed. Remember that, and \
ask Thomas Reed about the ledger. He will not want to tell you, but he owes me that much."

Thomas Reed, it turned out, was still alive. He lived alone in a stone house at the top of the hill, and he had not been \
seen in the village for several months. Agnes told Margaret that he was ill, or proud, or both, and that he would certainly \
refuse to see her. Margaret went anyway. She climbed the hill on a bright, cold afternoon, knocked three times on the heavy \
wooden door, and waited. After a long while she heard slow footsteps in the hall, and the sound of a bolt being drawn back, \
and the door opened just wide enough for an old man to look out at her with pale and suspicious eyes.

"I know who you are," he said. "You have your father's way of standing. I suppose you had better come in."
"""


def round5(x):
    return [round(float(v), 5) for v in x]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pick(default, fallback):
    return default if os.path.exists(default) else fallback


def check_norm_offset(model, gguf_path):
    """Compare every loaded *norm.weight with the raw GGUF tensor.

    llama.cpp's convert_hf_to_gguf.py stores Gemma RMSNorm weights as (w + 1).
    transformers' Gemma2TensorProcessor (also used for gemma3) does
    `weights - 1` for every GGUF tensor whose name contains "norm.weight".
    We assert loaded == raw - 1 exactly (f32), for every norm tensor."""
    from gguf import GGUFReader, dequantize

    reader = GGUFReader(gguf_path)
    raw = {t.name: dequantize(t.data, t.tensor_type).astype(np.float32)
           for t in reader.tensors if t.name.endswith("norm.weight")}
    name_map = {
        "attn_norm": "input_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
    }
    params = dict(model.named_parameters())
    n_checked = 0
    for gname, r in raw.items():
        if gname == "output_norm.weight":
            hname = "model.norm.weight"
        else:
            _, layer, kind, _ = gname.split(".")
            hname = f"model.layers.{layer}.{name_map[kind]}.weight"
        loaded = params[hname].detach().numpy()
        expect = r - np.float32(1.0)
        if not np.array_equal(loaded, expect):
            if np.array_equal(loaded, r):
                return False, f"{hname}: transformers did NOT subtract 1"
            return False, f"{hname}: loaded differs from raw-1 (max {np.abs(loaded - expect).max()})"
        n_checked += 1
    q = params["model.layers.0.self_attn.q_norm.weight"].detach()
    print(f"[norm] {n_checked} norm tensors: loaded == raw_gguf - 1.0 exactly (f32)")
    print(f"[norm] blk.0.attn_q_norm raw[:6]   = {raw['blk.0.attn_q_norm.weight'][:6].tolist()}")
    print(f"[norm] layers.0.q_norm loaded[:6] = {q[:6].tolist()}  (mean {q.mean():.4f}; applied as 1+w)")
    return True, n_checked


EXPECTED_CONFIG = {
    "hidden_size": 640,
    "num_hidden_layers": 18,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "intermediate_size": 2048,
    "sliding_window": 512,
    "query_pre_attn_scalar": 256,
    "vocab_size": 262144,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "hidden_activation": "gelu_pytorch_tanh",
    "tie_word_embeddings": True,
}
EXPECTED_LAYER_TYPES = ["full_attention" if i in (5, 11, 17) else "sliding_attention" for i in range(18)]
EXPECTED_ROPE = {
    "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
}


def check_config(cfg):
    """Returns a list of human-readable fixes applied (empty if none were needed)."""
    fixes = []
    for k, v in EXPECTED_CONFIG.items():
        got = getattr(cfg, k, None)
        if got != v:
            fixes.append(f"{k}: {got!r} -> {v!r}")
            setattr(cfg, k, v)
    if list(cfg.layer_types) != EXPECTED_LAYER_TYPES:
        fixes.append(f"layer_types: {cfg.layer_types} -> full at 5,11,17")
        cfg.layer_types = EXPECTED_LAYER_TYPES
    for lt, exp in EXPECTED_ROPE.items():
        got = dict(cfg.rope_parameters.get(lt, {}))
        if got.get("rope_type") != exp["rope_type"] or float(got.get("rope_theta", -1)) != exp["rope_theta"]:
            fixes.append(f"rope_parameters[{lt}]: {got} -> {exp}")
            cfg.rope_parameters[lt] = dict(exp)
    if abs(cfg.rms_norm_eps - 1e-6) > 1e-12:
        fixes.append(f"rms_norm_eps: {cfg.rms_norm_eps} -> 1e-6")
        cfg.rms_norm_eps = 1e-6
    return fixes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=pick(os.path.join(ROOT, "models/.cache/gemma-3-270m-q4_k_m.gguf"),
                                           "/tmp/gguf/gemma-3-270m-q4_k_m.gguf"))
    ap.add_argument("--tokenizer", default=pick(os.path.join(ROOT, "models/.cache/tokenizer/tokenizer.json"),
                                                "/tmp/tok/tokenizer.json"))
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/golden-270m.json"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    tok_dir = os.path.dirname(args.tokenizer) if args.tokenizer.endswith(".json") else args.tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_sha = sha256_file(args.gguf)
    if gguf_sha != GGUF_SHA256:
        sys.exit(f"GGUF sha256 mismatch: {gguf_sha}")
    print(f"[load] {args.gguf} (sha256 ok), tokenizer {tok_dir}")
    print(f"[load] torch {torch.__version__}, transformers {transformers.__version__}")

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(args.gguf), gguf_file=os.path.basename(args.gguf),
        dtype=torch.float32, attn_implementation="eager")
    model.eval()
    print(f"[load] {type(model).__name__} in {time.time() - t0:.1f}s")

    ok, info = check_norm_offset(model, args.gguf)
    if not ok:
        # transformers did not handle the +1: do it ourselves.
        print(f"[norm] {info}; subtracting 1.0 from all norm weights ourselves")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.sub_(1.0)
        norm_note = "subtracted by make_golden.py (transformers did not)"
    else:
        norm_note = "subtracted by transformers' GGUF loader (Gemma2TensorProcessor: weights - 1 for '*norm.weight')"

    fixes = check_config(model.config)
    print(f"[config] fixes applied: {fixes if fixes else 'none needed'}")
    if fixes:
        sys.exit("config fields changed after model construction; re-instantiate the model with the fixed config")

    # --- emulate the runtime's BF16 checkpoint --------------------------------
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16).to(torch.float32)
        emb = model.model.embed_tokens
        f32_scale = float(emb.embed_scale)
        bf16_scale = float(torch.tensor(640 ** 0.5, dtype=torch.float32).to(torch.bfloat16))
        assert bf16_scale == 25.25, bf16_scale
        emb.embed_scale.fill_(bf16_scale)
    print(f"[bf16] params rounded; embed_scale {f32_scale:.6f} -> {float(emb.embed_scale)}")
    assert model.lm_head.weight.data_ptr() == emb.weight.data_ptr() or torch.equal(model.lm_head.weight, emb.weight)

    tok = AutoTokenizer.from_pretrained(tok_dir)

    rng = np.random.default_rng(PROBE_SEED)
    probe_ids = sorted(set(rng.choice(np.arange(3, 262143), size=14, replace=False).tolist()) | {1, 262143})
    assert len(probe_ids) == 16
    probe_t = torch.tensor(probe_ids)

    @torch.no_grad()
    def logits_of(ids):
        return model(torch.tensor([ids]), use_cache=False).logits[0].float()

    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=N_GREEDY, min_new_tokens=N_GREEDY,
                               eos_token_id=None, pad_token_id=0, bos_token_id=2,
                               temperature=None, top_p=None, top_k=None)

    cases = []
    all_cases = SHORT_CASES + [("long_prose", LONG_PROMPT)]
    for name, prompt in all_cases:
        ids = tok(prompt, add_special_tokens=True)["input_ids"]
        assert ids[0] == 2, "BOS expected"
        t0 = time.time()
        lg = logits_of(ids)
        top = torch.topk(lg, N_TOP, dim=-1)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 generation_config=gen_cfg)
        greedy = out[0, len(ids):].tolist()
        assert len(greedy) == N_GREEDY, len(greedy)
        # teacher-forced re-scoring of prompt + greedy continuation
        lg_full = logits_of(ids + greedy)
        steps = lg_full[len(ids) - 1: len(ids) - 1 + N_GREEDY]
        t2 = torch.topk(steps, 2, dim=-1)
        margins = (t2.values[:, 0] - t2.values[:, 1]).tolist()
        tf_argmax = t2.indices[:, 0].tolist()
        agree = [a == g for a, g in zip(tf_argmax, greedy)]
        # The prompt-only forward and the extended forward must agree on prompt positions.
        d = (lg_full[: len(ids)] - lg).abs().max().item()
        text = tok.decode(greedy)
        print(f"\n[case {name}] {len(ids)} prompt tokens, {time.time() - t0:.1f}s, "
              f"prompt-vs-extended max|dlogit| {d:.2e}, tf-argmax agrees {sum(agree)}/{N_GREEDY}, "
              f"min margin {min(margins):.4f}")
        print(f"  greedy: {text!r}")
        cases.append({
            "name": name,
            "prompt": prompt,
            "prompt_ids": ids,
            "top_ids": top.indices.tolist(),
            "top_logits": [round5(r) for r in top.values.tolist()],
            "probe_logits": [round5(r) for r in lg[:, probe_t].tolist()],
            "greedy_ids": greedy,
            "greedy_text": text,
            "greedy_margins": round5(margins),
            "greedy_tf_agree": agree,
        })

    # --- layer taps for the first short prompt --------------------------------
    ids0 = cases[0]["prompt_ids"]
    taps = {}

    def hook(key):
        def f(_m, _inp, out):
            h = out[0] if isinstance(out, tuple) else out
            taps[key] = h[0, -1].detach().float().clone()
        return f

    hs = [model.model.embed_tokens.register_forward_hook(hook("embed"))]
    hs += [layer.register_forward_hook(hook(f"layer{i}")) for i, layer in enumerate(model.model.layers)]
    hs.append(model.model.norm.register_forward_hook(hook("final_norm")))
    with torch.no_grad():
        out = model(torch.tensor([ids0]), use_cache=False, output_hidden_states=True)
    for h in hs:
        h.remove()
    n_layers = len(model.model.layers)
    layer_norms = [taps[f"layer{i}"].norm().item() for i in range(n_layers)]
    # cross-check the hooks against output_hidden_states
    hsl = out.hidden_states
    print(f"\n[taps] output_hidden_states has {len(hsl)} entries")
    assert torch.allclose(hsl[0][0, -1], taps["embed"])
    for i in range(n_layers - 1):
        assert torch.allclose(hsl[i + 1][0, -1], taps[f"layer{i}"]), i
    last_matches = "final_norm" if torch.allclose(hsl[-1][0, -1], taps["final_norm"]) else f"layer{n_layers - 1}"
    print(f"[taps] hidden_states[i+1] == output of decoder layer i; hidden_states[-1] == {last_matches}")
    layer_taps = {
        "case": cases[0]["name"],
        "position": len(ids0) - 1,
        "note": ("L2 norms of the last-position hidden state (residual stream). embed_norm: after "
                 "embedding * embed_scale; layer_norms[i]: output of decoder layer i (before the final "
                 "norm); final_norm_norm: after model.norm. *_head8: first 8 elements of that vector. "
                 f"transformers' output_hidden_states[-1] is {last_matches}."),
        "embed_norm": round(taps["embed"].norm().item(), 5),
        "embed_head8": round5(taps["embed"][:8]),
        "layer_norms": round5(layer_norms),
        "layer_head8": [round5(taps[f"layer{i}"][:8]) for i in range(n_layers)],
        "final_norm_norm": round(taps["final_norm"].norm().item(), 5),
        "final_norm_head8": round5(taps["final_norm"][:8]),
    }
    print(f"[taps] layer norms: {[round(x, 2) for x in layer_norms]}")

    cfg = model.config
    doc = {
        "model": "gemma-3-270m (Q4_K_M GGUF, dequantized, bf16-rounded)",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "gguf_version": _gguf_version(),
        "gguf_sha256": gguf_sha,
        "embed_scale": float(model.model.embed_tokens.embed_scale),
        "weights": "bf16-rounded",
        "norm_offset": norm_note,
        "attn_implementation": "eager",
        "compute_dtype": "float32",
        "config": {
            "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size,
            "sliding_window": cfg.sliding_window, "layer_types": list(cfg.layer_types),
            "rope_parameters": cfg.rope_parameters, "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
            "rms_norm_eps": cfg.rms_norm_eps, "vocab_size": cfg.vocab_size,
        },
        "config_fixes": fixes,
        "generation": ("model.generate(do_sample=False, max_new_tokens=32, min_new_tokens=32, eos_token_id=None) "
                       "(KV-cached); EOS never stops generation. greedy_tf_agree (teacher-forced argmax == "
                       "generated token) is checked, so greedy_ids is the plain argmax chain wherever it is true."),
        "greedy_margins_note": ("greedy_margins[k] = top1 - top2 logit of a teacher-forced forward of "
                                "prompt_ids + greedy_ids at position len(prompt_ids)-1+k; greedy_tf_agree[k] is "
                                "whether its argmax equals greedy_ids[k]."),
        "n_top": N_TOP,
        "probe_seed": PROBE_SEED,
        "probe_ids": probe_ids,
        "cases": cases,
        "layer_taps": layer_taps,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, separators=(",", ":"), ensure_ascii=False)
        f.write("\n")
    print(f"\n[out] {args.out}: {os.path.getsize(args.out)} bytes")


def _gguf_version():
    try:
        from importlib.metadata import version
        return version("gguf")
    except Exception:
        return None


if __name__ == "__main__":
    main()
