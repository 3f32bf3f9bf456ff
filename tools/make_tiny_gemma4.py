#!/usr/bin/env python3
"""Generate tests/fixtures/tiny-gemma4/<variant>/: tiny random Gemma 4 checkpoints + reference logits.

Each model is built by transformers (Gemma4TextConfig inside Gemma4Config, Gemma4ForConditionalGeneration
with no vision/audio tower, so tensors are stored under `model.language_model.` as in the released
checkpoints), initialised with a fixed torch seed to non-trivial values, and saved in bfloat16 safetensors:

* every RMSNorm weight, `router.scale`: 1 + N(0, 0.3)          (Gemma 4 applies x*w: an x*(1+w) bug shows)
* `layer_scalar`, `router.per_expert_scale`: U(0.5, 1.5)       (HF initialises them to ones)
* embeddings N(0, 0.5); matrices and experts N(0, 1/fan_in)
* final_logit_softcapping 10 (real models: 30) so that the cap visibly bends these small logits

Variants (all: head_dim 16 on sliding layers, global_head_dim 32 on full layers, proportional RoPE with
partial_rotary_factor 0.25 on full layers, attention scale 1.0, v_norm):
  dense31b  k_eq_v, 2 kv heads (sliding) / 1 (full), 6 layers (full at 2, 5), window 4
  dense12b  k_eq_v, 4 kv heads / 1 (full), 7 layers (full at 3, 6), window 3, theta 5e5 on full layers
  e2b       PLE (8 per layer), KV sharing of the last 3 of 8 layers, double-wide MLP, kv 1 / 1
  moe26b    MoE (4 experts, top 2, expert inter 16) beside the dense MLP, k_eq_v

Outputs per variant (tests/fixtures/tiny-gemma4/<variant>/):
  config.json        as transformers 5.23 saves it (`per_layer_config`)
  config.hub.json    the same model in the hub's keys (`global_head_dim`, `num_global_key_value_heads`,
                     no per_layer_config), verified to load to identical logits in transformers
  model.safetensors  bfloat16 (the float32 reference computes on these values, embedding scales bf16-rounded
                     as transformers does for a BF16 table)
  logits.json        teacher-forced logits for 2 prompts and 8 greedy tokens each (schema as tiny-gemma3)

Usage: /tmp/oracle/bin/python tools/make_tiny_gemma4.py [--out DIR]
"""
import argparse
import copy
import json
import math
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 4321
SEQ_LEN = 12
N_GREEDY = 8
S, F = "sliding_attention", "full_attention"

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=16,
    num_attention_heads=4,
    head_dim=16,
    hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
    tie_word_embeddings=True,
    final_logit_softcapping=10.0,
    hidden_size_per_layer_input=0,
)

VARIANTS = {
    "dense31b": dict(
        num_hidden_layers=6, num_key_value_heads=2, layer_types=[S, S, F, S, S, F], sliding_window=4,
        global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
    ),
    "dense12b": dict(
        num_hidden_layers=7, num_key_value_heads=4, layer_types=[S, S, S, F, S, S, F], sliding_window=3,
        global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 500_000.0},
        },
    ),
    "e2b": dict(
        num_hidden_layers=8, num_key_value_heads=1, layer_types=[S, F, S, S, F, S, S, F], sliding_window=4,
        global_head_dim=32, attention_k_eq_v=False, num_kv_shared_layers=3, use_double_wide_mlp=True,
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=64,
    ),
    "moe26b": dict(
        num_hidden_layers=6, num_key_value_heads=2, layer_types=[S, S, F, S, S, F], sliding_window=4,
        global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
        enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16,
    ),
}


def make_config(variant):
    from transformers import Gemma4Config, Gemma4TextConfig
    kw = dict(COMMON)
    kw.update(VARIANTS[variant])
    text = Gemma4TextConfig(**kw)
    return Gemma4Config(text_config=text, vision_config=None, audio_config=None)


@torch.no_grad()
def init_weights(model, gen):
    for name, p in model.named_parameters():
        if name.split(".")[-2].endswith(("norm", "norm_1", "norm_2")) or name.endswith("router.scale"):
            p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.3)
        elif name.endswith("per_expert_scale"):
            p.copy_(0.5 + torch.rand(p.shape, generator=gen))
        elif name.endswith("embed_tokens.weight") or name.endswith("embed_tokens_per_layer.weight"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        elif p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
        else:
            raise RuntimeError(f"unexpected parameter {name} {tuple(p.shape)}")
    for name, b in model.named_buffers():
        if name.endswith("layer_scalar"):
            b.copy_(0.5 + torch.rand(b.shape, generator=gen))


@torch.no_grad()
def set_bf16_embed_scales(model):
    """The scales a BF16 checkpoint gets in transformers (`embed_scale.to(weight.dtype)`), kept in the
    float32 reference model: bf16(sqrt(H)) and bf16(sqrt(P))."""
    lm = model.model.language_model
    tables = [lm.embed_tokens] + ([lm.embed_tokens_per_layer] if lm.hidden_size_per_layer_input else [])
    for t in tables:
        exact = float(t.scalar_embed_scale)
        t.embed_scale.fill_(float(torch.tensor(exact).to(torch.bfloat16)))
        assert float(t.embed_scale) != float(torch.tensor(exact, dtype=torch.float32)), "rounding must show"


def hub_config(saved):
    """The saved config rewritten in the hub's keys (no per_layer_config)."""
    hub = copy.deepcopy(saved)
    t = hub["text_config"]
    plc = t.pop("per_layer_config")
    heads = {tuple(sorted(v.items())) for v in plc.values()}
    assert len(heads) == 1, plc
    over = dict(next(iter(heads)))
    t["global_head_dim"] = over["head_dim"]
    if "num_key_value_heads" in over:
        t["num_global_key_value_heads"] = over["num_key_value_heads"]
    return hub


def run_variant(variant, out):
    import transformers
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    torch.manual_seed(SEED)
    cfg = make_config(variant)
    model = Gemma4ForConditionalGeneration(cfg).to(torch.float32)
    gen = torch.Generator().manual_seed(SEED + sum(map(ord, variant)))
    init_weights(model, gen)
    model.eval()
    os.makedirs(out, exist_ok=True)
    # Stored in BF16 (half the bytes; the loader must then round the embedding scales to BF16 as
    # transformers does for a BF16 table); the reference runs in float32 on exactly those values.
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    for extra in ("generation_config.json",):
        p = os.path.join(out, extra)
        if os.path.exists(p):
            os.remove(p)

    reloaded = Gemma4ForConditionalGeneration.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    reloaded.eval()
    sd0, sd1 = model.state_dict(), reloaded.state_dict()
    for k in sd0:
        assert torch.equal(sd0[k].bfloat16().float(), sd1[k]), k
    set_bf16_embed_scales(reloaded)
    # layer_scalar is a persistent buffer: it must round-trip through the file
    ls = [float(l.layer_scalar) for l in reloaded.model.language_model.layers]
    assert all(abs(x - 1.0) > 1e-6 for x in ls), ls

    with open(os.path.join(out, "config.json")) as f:
        saved = json.load(f)
    hub = hub_config(saved)
    with open(os.path.join(out, "config.hub.json"), "w") as f:
        json.dump(hub, f, indent=2)
        f.write("\n")
    hub_cfg = Gemma4Config.from_dict(hub)
    hub_cfg._attn_implementation = "eager"
    hub_model = Gemma4ForConditionalGeneration(hub_cfg).to(torch.float32)
    missing = hub_model.load_state_dict(reloaded.state_dict(), strict=False)
    assert not missing.unexpected_keys, missing
    hub_model.eval()
    set_bf16_embed_scales(hub_model)

    g = torch.Generator().manual_seed(SEED + 1)
    vocab = cfg.text_config.vocab_size
    cases = []
    for _ in range(2):
        ids = [2] + torch.randint(3, vocab, (SEQ_LEN - 1,), generator=g).tolist()
        x = torch.tensor([ids])
        with torch.no_grad():
            lg = reloaded(input_ids=x, use_cache=False).logits[0].float()
            lg_hub = hub_model(input_ids=x, use_cache=False).logits[0].float()
            assert torch.equal(lg, lg_hub), (lg - lg_hub).abs().max()
            # Greedy by full recomputation (no cache). transformers' generate() disagreed with its own
            # teacher-forced argmax on a draft of the e2b variant (KV-shared prefill slicing), so it is not used.
            seq = list(ids)
            for _ in range(N_GREEDY):
                nxt = int(reloaded(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax())
                seq.append(nxt)
            # and through transformers' KV cache, one token at a time
            o = reloaded(input_ids=x, use_cache=True)
            cached, pkv = [int(o.logits[0, -1].argmax())], o.past_key_values
            for _ in range(N_GREEDY - 1):
                o = reloaded(input_ids=torch.tensor([[cached[-1]]]), past_key_values=pkv, use_cache=True)
                pkv = o.past_key_values
                cached.append(int(o.logits[0, -1].argmax()))
        greedy = seq[len(ids):]
        assert cached == greedy, (cached, greedy)
        assert len(greedy) == N_GREEDY
        with torch.no_grad():
            lg_full = reloaded(input_ids=torch.tensor([ids + greedy]), use_cache=False).logits[0].float()
        steps = lg_full[len(ids) - 1: len(ids) - 1 + N_GREEDY]
        t2 = torch.topk(steps, 2, dim=-1)
        assert t2.indices[:, 0].tolist() == greedy, "KV-cached greedy differs from teacher-forced argmax"
        print(f"{variant}: {ids} -> {greedy}; logits range [{lg.min():.2f}, {lg.max():.2f}], "
              f"min greedy margin {float((t2.values[:, 0] - t2.values[:, 1]).min()):.4f}")
        cases.append({
            "input_ids": ids,
            "logits": [[round(float(v), 6) for v in row] for row in lg.tolist()],
            "greedy_ids": greedy,
            "greedy_margins": [round(float(v), 6) for v in (t2.values[:, 0] - t2.values[:, 1]).tolist()],
        })
    doc = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "seed": SEED,
        "variant": variant,
        "dtype": "weights bfloat16 (stored), computed in float32 with bf16(sqrt(H)) / bf16(sqrt(P)) embedding scales",
        "attn_implementation": "eager",
        "vocab_size": vocab,
        "layer_scalars": ls,
        "logits_layout": "cases[i].logits[position][token_id], teacher-forced, position 0 = BOS",
        "generation": "greedy argmax of full recomputation, 8 tokens, checked equal to transformers' KV-cached "
                      "one-token decode",
        "cases": cases,
    }
    with open(os.path.join(out, "logits.json"), "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    for fn in sorted(os.listdir(out)):
        print(f"  {variant}/{fn}: {os.path.getsize(os.path.join(out, fn))} bytes")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/tiny-gemma4"))
    ap.add_argument("variants", nargs="*", default=list(VARIANTS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    for v in args.variants:
        run_variant(v, os.path.join(args.out, v))


if __name__ == "__main__":
    main()
