#!/usr/bin/env python3
"""Generate tests/fixtures/tiny-gemma3/: a tiny random Gemma3ForCausalLM + reference logits.

Independent-implementation test for the Rust forward pass without big files.
The model is built by transformers (Gemma3TextConfig / Gemma3ForCausalLM),
initialised with a fixed torch seed to *non-trivial* values (norm weights
~N(0, 0.5) so that (1+w) vs w bugs show, matrices scaled ~1/sqrt(fan_in) so
activations stay O(1)), and saved in float32 safetensors via save_pretrained.

Architecture exercised: GQA (4 q heads / 2 kv heads), head_dim 16 with
hidden 32 (q dim 64 != hidden), sliding window 4 on layers 0,1,3,4 and full
attention on layers 2,5, separate rope bases (1e6 full / 1e4 sliding), linear
rope scaling factor 8 on full layers only, query_pre_attn_scalar 24 (!= head_dim),
tied embeddings, f32 embed_scale sqrt(32).

Outputs (in tests/fixtures/tiny-gemma3/):
  config.json        as written by transformers 5.x save_pretrained (rope_parameters, layer_types)
  config.v4.json     the same model in transformers 4.x key style (hand-written, verified to load
                     to an identical config/forward in the installed transformers)
  generation_config.json   (written by save_pretrained)
  model.safetensors  float32
  logits.json        see README.md for the schema

Usage: /tmp/oracle/bin/python tools/make_tiny_gemma3.py [--out DIR]
"""
import argparse
import json
import math
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 1234
SEQ_LEN = 12
N_GREEDY = 8
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention",
               "sliding_attention", "sliding_attention", "full_attention"]
SLIDING_WINDOW_PATTERN = 3  # 4.x equivalent of LAYER_TYPES: layer i is full iff (i+1) % 3 == 0


def make_config():
    from transformers import Gemma3TextConfig
    return Gemma3TextConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=True,
        query_pre_attn_scalar=24,
        sliding_window=4,
        layer_types=list(LAYER_TYPES),
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        attention_bias=False,
        use_cache=True,
    )


def v4_config_dict(cfg):
    """Hand-written transformers 4.x style config for the same model.

    Mapping (5.x -> 4.x):
      rope_parameters.full_attention.rope_theta      -> rope_theta
      rope_parameters.sliding_attention.rope_theta   -> rope_local_base_freq
      rope_parameters.full_attention.{rope_type,factor} -> rope_scaling {"rope_type","factor"}
                                                        (4.x applies rope_scaling to global layers only)
      layer_types                                    -> sliding_window_pattern (layer i full iff (i+1)%p==0)
    """
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_activation": cfg.hidden_activation,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "tie_word_embeddings": True,
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
        "sliding_window": cfg.sliding_window,
        "sliding_window_pattern": SLIDING_WINDOW_PATTERN,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
        "transformers_version": "4.x-style (hand-written by tools/make_tiny_gemma3.py)",
    }


@torch.no_grad()
def init_weights(model, gen):
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)       # applied as (1 + w)
        elif name == "model.embed_tokens.weight":
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)       # x embed_scale 5.66 -> rms ~2.8
        elif p.dim() == 2:
            fan_in = p.shape[1]
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
        else:
            raise RuntimeError(f"unexpected parameter {name}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/tiny-gemma3"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, Gemma3ForCausalLM, GenerationConfig

    cfg = make_config()
    model = Gemma3ForCausalLM(cfg).to(torch.float32)
    model.config._attn_implementation = "eager"
    gen = torch.Generator().manual_seed(SEED)
    init_weights(model, gen)
    model.eval()

    # sanity: linear rope scaling really is applied to full layers only
    rot = model.model.rotary_emb
    base_full = 1.0 / (1e6 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    base_slide = 1.0 / (1e4 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    assert torch.allclose(rot.full_attention_inv_freq, base_full / 8.0), rot.full_attention_inv_freq
    assert torch.allclose(rot.sliding_attention_inv_freq, base_slide)
    embed_scale = float(model.model.embed_tokens.embed_scale)
    assert embed_scale == float(torch.tensor(32 ** 0.5, dtype=torch.float32)), embed_scale

    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)

    # 4.x style config; verify it loads to the same architecture and the same logits
    v4 = v4_config_dict(cfg)
    with open(os.path.join(args.out, "config.v4.json"), "w") as f:
        json.dump(v4, f, indent=2)
        f.write("\n")

    # reload from disk (config.json + safetensors) to make sure the fixture is what we test
    reloaded = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32, attn_implementation="eager")
    reloaded.eval()
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1

    cfg_v4 = AutoConfig.for_model(**{k: v for k, v in v4.items() if k not in ("transformers_version",)})
    cfg_v4._attn_implementation = "eager"
    for k in ("layer_types", "rope_parameters", "sliding_window", "query_pre_attn_scalar", "head_dim",
              "num_key_value_heads", "tie_word_embeddings", "rms_norm_eps"):
        a, b = getattr(cfg_v4, k), getattr(reloaded.config, k)
        assert a == b, (k, a, b)
    model_v4 = Gemma3ForCausalLM(cfg_v4).to(torch.float32)
    model_v4.load_state_dict(reloaded.state_dict(), strict=False)
    model_v4.tie_weights()
    model_v4.eval()

    g = torch.Generator().manual_seed(SEED + 1)
    seqs = []
    for _ in range(2):
        body = torch.randint(3, cfg.vocab_size, (SEQ_LEN - 1,), generator=g).tolist()
        seqs.append([2] + body)

    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=N_GREEDY, min_new_tokens=N_GREEDY,
                               eos_token_id=None, pad_token_id=0, bos_token_id=2)
    cases = []
    for ids in seqs:
        x = torch.tensor([ids])
        with torch.no_grad():
            out = reloaded(x, use_cache=False, output_hidden_states=True)
            lg = out.logits[0].float()
            lg_v4 = model_v4(x, use_cache=False).logits[0].float()
            assert torch.equal(lg, lg_v4), (lg - lg_v4).abs().max()
            g_out = reloaded.generate(x, attention_mask=torch.ones_like(x), generation_config=gen_cfg)
        greedy = g_out[0, len(ids):].tolist()
        assert len(greedy) == N_GREEDY
        with torch.no_grad():
            lg_full = reloaded(torch.tensor([ids + greedy]), use_cache=False).logits[0].float()
        steps = lg_full[len(ids) - 1: len(ids) - 1 + N_GREEDY]
        t2 = torch.topk(steps, 2, dim=-1)
        assert t2.indices[:, 0].tolist() == greedy, "KV-cached greedy differs from teacher-forced argmax"
        hs = out.hidden_states  # [embed, layer0..layer4 outputs, final-normed]
        print(f"seq {ids}\n  greedy {greedy}\n  logits std {lg.std():.3f} range [{lg.min():.2f}, {lg.max():.2f}]"
              f"\n  last-pos hidden norms {[round(h[0, -1].norm().item(), 2) for h in hs]}")
        cases.append({
            "input_ids": ids,
            "logits": [[round(float(v), 6) for v in row] for row in lg.tolist()],
            "greedy_ids": greedy,
            "greedy_margins": [round(float(v), 6) for v in (t2.values[:, 0] - t2.values[:, 1]).tolist()],
            "hidden_norms_last_pos": [round(h[0, -1].norm().item(), 6) for h in hs],
        })

    doc = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "seed": SEED,
        "dtype": "float32",
        "attn_implementation": "eager",
        "embed_scale": embed_scale,
        "embed_scale_note": "float32(sqrt(hidden_size)) = float32(sqrt(32)); embeddings are f32 here (no bf16 rounding)",
        "vocab_size": cfg.vocab_size,
        "seq_len": SEQ_LEN,
        "logits_layout": "cases[i].logits[position][token_id], teacher-forced, position 0 = BOS",
        "generation": "model.generate(do_sample=False, max_new_tokens=8, min_new_tokens=8, eos_token_id=None); "
                      "checked equal to the teacher-forced argmax chain",
        "hidden_norms_note": ("L2 norm at the last position of output_hidden_states: [0] embed*scale, "
                              "[1..5] outputs of decoder layers 0..4, [6] after the final norm (layer 5 output "
                              "is not exposed by transformers)"),
        "cases": cases,
    }
    with open(os.path.join(args.out, "logits.json"), "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")

    total = 0
    for fn in sorted(os.listdir(args.out)):
        sz = os.path.getsize(os.path.join(args.out, fn))
        total += sz
        print(f"  {fn}: {sz} bytes")
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
