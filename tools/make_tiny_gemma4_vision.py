#!/usr/bin/env python3
"""Generate the Gemma 4 image fixtures with transformers 5.23 (torch 2.15, torchvision, pillow):

1. tests/fixtures/images/gemma4_pixels.json: `Gemma4ImageProcessor` (the torchvision backend, which
   AutoImageProcessor picks with torchvision installed) at its defaults (patch 16, pooling 3, 280 soft tokens) on
   every image of tests/fixtures/images: the resized size, the soft-token count, the per-channel mean of the
   resized image and a strided subsample (every STRIDE-th row and column) as uint8 levels round(x * 255); plus
   the resized sizes at every soft-token budget (70, 140, 280, 560, 1120).

2. tests/fixtures/tiny-gemma4-vision/<variant>/: a tiny random Gemma4ForConditionalGeneration with a vision tower
   (vision hidden 32, 2 layers, 4 heads of 8, patch 2, pooling 3, position table 64) and what transformers
   computes with it. Images grad_160x120.png and alpha_96x64.png through Gemma4ImageProcessor(patch_size=2,
   max_soft_tokens=70) (54x42 -> 63 soft tokens, 60x36 -> 60), padded to 630 patches as the processor does.
   Variants:
     bidir   a 31B-like text model (k_eq_v, sliding window 4, full at 2 and 5) with
             use_bidirectional_attention="vision"; the tower with clipped linears and standardize
     e2b     an E2B-like text model (PLE, KV sharing, causal); the tower without clipping or standardize
   processor_config.json gives the tiny processor settings (max_soft_tokens 70, patch 2, pooling 3).
   Weights: norms 1 + N(0, 0.3), matrices N(0, 1/fan_in), position tables N(0, 0.5), clip bounds +-U(0.7, 2)
   on inputs and +-U(0.5, 1.5) on outputs (they bite), std_bias N(0, 1), std_scale U(0.5, 1.5); saved BF16.

   reference.json:
     input_ids           BOS, text, <|image> 63 x <|image|> <image|>, text, <|image> 60 x <|image|> <image|>, text
     image_token_id, boi_token_id, eoi_token_id, pad_token_id
     images, soft_tokens the image files and the soft tokens of each
     image_features      [63 + 60, 32] get_image_features(...).pooler_output (embed_vision output), concatenated
     vision_hidden       [63 + 60, 32] the vision tower's output (pooled, scaled, standardized) before embed_vision
     logits              [T, 64] float32, mm_token_type_ids given (the bidirectional mask where the model has it)
     logits_causal       [T, 64] without mm_token_type_ids (plain causal; bidir only)
     greedy              8 greedy tokens (argmax of full recomputation, images and mm_token_type_ids given)
   (pixel values: tiny-gemma4-vision/pixels.json, shared; positions are checked row-major here.)

3. tests/fixtures/tiny-gemma4-vision/unified/: the 12B-like encoder-free Gemma4UnifiedForConditionalGeneration
   (merged 6x6x3 patches -> LayerNorm, dense, LayerNorm, + factorized positions, LayerNorm -> embed_vision;
   text 31B-like, use_bidirectional_attention "vision" by default), same images and prompt: image_features,
   logits, greedy. Its processor's merged patches are checked to be the 6x6 blocks of the tower pixels.

Usage: /tmp/oracle/bin/python tools/make_tiny_gemma4_vision.py
"""
import json
import math
import os

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = os.path.join(ROOT, "tests", "fixtures", "images")
OUT = os.path.join(ROOT, "tests", "fixtures", "tiny-gemma4-vision")
SEED = 4321
STRIDE = 41
BOI, IMG, EOI = 61, 60, 62
S, F = "sliding_attention", "full_attention"
N_GREEDY = 8
TINY_IMAGES = ["grad_160x120.png", "alpha_96x64.png"]

TEXT = dict(
    vocab_size=64, hidden_size=32, intermediate_size=16, num_attention_heads=4, head_dim=16,
    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=256, rms_norm_eps=1e-6, pad_token_id=0,
    eos_token_id=1, bos_token_id=2, tie_word_embeddings=True, final_logit_softcapping=10.0,
    hidden_size_per_layer_input=0,
)
VARIANTS = {
    "bidir": dict(
        text=dict(num_hidden_layers=4, num_key_value_heads=2, layer_types=[S, S, F, F], sliding_window=4,
                  global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
                  use_bidirectional_attention="vision"),
        vision=dict(use_clipped_linears=True, standardize=True),
        images=TINY_IMAGES,
    ),
    "e2b": dict(
        text=dict(num_hidden_layers=4, num_key_value_heads=1, layer_types=[S, F, S, F], sliding_window=4,
                  global_head_dim=32, attention_k_eq_v=False, num_kv_shared_layers=2, use_double_wide_mlp=True,
                  hidden_size_per_layer_input=8, vocab_size_per_layer_input=64),
        vision=dict(use_clipped_linears=False, standardize=False),
        images=TINY_IMAGES[:1],
    ),
}
VISION = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
    head_dim=8, rms_norm_eps=1e-6, pooling_kernel_size=3, patch_size=2, position_embedding_size=64,
    rope_parameters={"rope_type": "axial", "rope_theta": 100.0},
)


def processor(**kw):
    from transformers.models.gemma4.image_processing_gemma4 import Gemma4ImageProcessor
    return Gemma4ImageProcessor(**kw)


def load(file):
    return Image.open(os.path.join(IMAGES, file))


def unpatch(patches, n, ph, pw, p):
    """[n, p*p*3] patches (y, x, c) of a ph x pw grid -> [3, ph*p, pw*p]."""
    x = patches[:n].reshape(ph, pw, p, p, 3).permute(4, 0, 2, 1, 3)
    return x.reshape(3, ph * p, pw * p)


def pixel_fixture():
    from transformers.models.gemma4.image_processing_gemma4 import get_aspect_ratio_preserving_size
    proc = processor()
    assert (proc.patch_size, proc.pooling_kernel_size, proc.max_soft_tokens) == (16, 3, 280)
    out = {"processor": type(proc).__name__, "resample": str(proc.resample), "stride": STRIDE, "images": []}
    for file in sorted(os.listdir(IMAGES)):
        if not file.endswith((".png", ".jpg", ".webp")):
            continue
        img = load(file)
        bf = proc(images=[img], return_tensors="pt")
        pos = bf["image_position_ids"][0]
        n = int((pos[:, 0] >= 0).sum())
        pw, ph = int(pos[:n, 0].max()) + 1, int(pos[:n, 1].max()) + 1
        chw = unpatch(bf["pixel_values"][0], n, ph, pw, 16)
        levels = chw * 255
        assert torch.allclose(levels, levels.round(), atol=1e-3), "pixel values are uint8 / 255"
        sizes = {}
        for budget in (70, 140, 280, 560, 1120):
            sizes[str(budget)] = list(get_aspect_ratio_preserving_size(
                img.height, img.width, patch_size=16, max_patches=budget * 9, pooling_kernel_size=3))
        out["images"].append({
            "file": file, "width": img.width, "height": img.height,
            "resized": [ph * 16, pw * 16], "soft_tokens": int(bf["num_soft_tokens_per_image"][0]),
            "mean": [float(chw[c].double().mean()) for c in range(3)],
            "subsample": levels.round().to(torch.int64)[:, ::STRIDE, ::STRIDE].tolist(),
            "sizes": sizes,
        })
        print(f"{file}: {img.width}x{img.height} -> {pw * 16}x{ph * 16}, {out['images'][-1]['soft_tokens']} tokens")
    with open(os.path.join(IMAGES, "gemma4_pixels.json"), "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")


def make_model(variant):
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration, Gemma4TextConfig, Gemma4VisionConfig
    spec = VARIANTS[variant]
    text = Gemma4TextConfig(**{**TEXT, **spec["text"]})
    vision = Gemma4VisionConfig(**{**VISION, **spec["vision"]})
    cfg = Gemma4Config(text_config=text, vision_config=vision, audio_config=None, image_token_id=IMG,
                       boi_token_id=BOI, eoi_token_id=EOI, video_token_id=63, audio_token_id=59)
    torch.manual_seed(SEED)
    model = Gemma4ForConditionalGeneration(cfg).float()
    g = torch.Generator().manual_seed(SEED + sum(map(ord, variant)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-2].endswith("norm"):
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.3)
            elif name.endswith("position_embedding_table") or "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:
                raise RuntimeError(f"unexpected parameter {name} {tuple(p.shape)}")
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
            elif name.endswith(("input_min", "input_max")):
                b.copy_((0.7 + 1.3 * torch.rand(b.shape, generator=g)) * (1 if name.endswith("max") else -1))
            elif name.endswith(("output_min", "output_max")):
                b.copy_((0.5 + torch.rand(b.shape, generator=g)) * (1 if name.endswith("max") else -1))
            elif name.endswith("std_bias"):
                b.copy_(torch.randn(b.shape, generator=g))
            elif name.endswith("std_scale"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model.eval()


def run_variant(variant):
    import transformers
    from transformers import Gemma4ForConditionalGeneration

    out = os.path.join(OUT, variant)
    os.makedirs(out, exist_ok=True)
    model = make_model(variant)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    for extra in ("generation_config.json",):
        p = os.path.join(out, extra)
        if os.path.exists(p):
            os.remove(p)
    # The image processor's settings as a hub checkpoint's processor_config.json carries them.
    with open(os.path.join(out, "processor_config.json"), "w") as f:
        json.dump({"image_processor": {"image_processor_type": "Gemma4ImageProcessor", "max_soft_tokens": 70,
                                       "patch_size": 2, "pooling_kernel_size": 3}}, f, indent=2)
        f.write("\n")
    m = Gemma4ForConditionalGeneration.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    # BF16 tables get a BF16 embedding scale in transformers; keep that in the float32 reference.
    lm = m.model.language_model
    for t in [lm.embed_tokens] + ([lm.embed_tokens_per_layer] if lm.hidden_size_per_layer_input else []):
        t.embed_scale.fill_(float(torch.tensor(float(t.scalar_embed_scale)).to(torch.bfloat16)))

    files = VARIANTS[variant]["images"]
    pv, pos, ntok = tiny_pixels(files)
    g = torch.Generator().manual_seed(SEED + 7)
    txt = lambda k: torch.randint(3, 59, (k,), generator=g).tolist()
    ids = [2] + txt(4)
    for n in ntok:
        ids += [BOI] + [IMG] * n + [EOI] + txt(3)
    x = torch.tensor([ids])
    types = (x == IMG).long()
    with torch.no_grad():
        vis = m.model.vision_tower(pixel_values=pv, pixel_position_ids=pos).last_hidden_state
        feats = torch.cat(m.model.get_image_features(pv, pos, return_dict=True).pooler_output)
        lg = m(input_ids=x, pixel_values=pv, image_position_ids=pos, mm_token_type_ids=types,
               use_cache=False).logits[0].float()
        lg_causal = m(input_ids=x, pixel_values=pv, image_position_ids=pos, use_cache=False).logits[0].float()
        seq = list(ids)
        for _ in range(N_GREEDY):
            s = torch.tensor([seq])
            nxt = m(input_ids=s, pixel_values=pv, image_position_ids=pos, mm_token_type_ids=(s == IMG).long(),
                    use_cache=False).logits[0, -1]
            seq.append(int(nxt.argmax()))
    assert feats.shape == (sum(ntok), 32), feats.shape
    diff = float((lg - lg_causal).abs().max())
    bidir = m.config.text_config.use_bidirectional_attention == "vision"
    assert (diff > 1.0) == bidir, diff
    print(f"{variant}: {len(ids)} tokens, soft tokens {ntok}; logits range [{lg.min():.2f}, {lg.max():.2f}], "
          f"max |mask on - off| {diff:.4f}; greedy {seq[len(ids):]}")
    r = lambda t, d: [round(float(v), d) for v in t.flatten().tolist()]
    doc = {
        "transformers_version": transformers.__version__, "torch_version": torch.__version__, "seed": SEED,
        "variant": variant, "attn_implementation": "eager",
        "dtype": "weights bfloat16 (stored), computed in float32 with bf16 embedding scales",
        "image_token_id": IMG, "boi_token_id": BOI, "eoi_token_id": EOI, "pad_token_id": 0,
        "images": files, "soft_tokens": ntok, "input_ids": ids,
        "vision_hidden": r(vis, 5), "image_features": r(feats, 5), "logits": r(lg, 4),
        "greedy": seq[len(ids):],
    }
    if bidir:
        doc["logits_causal"] = r(lg_causal, 4)
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    for fn in sorted(os.listdir(out)):
        print(f"  {variant}/{fn}: {os.path.getsize(os.path.join(out, fn))} bytes")


def tiny_pixels(files):
    proc = processor(patch_size=2, max_soft_tokens=70, pooling_kernel_size=3)
    bf = proc(images=[load(f) for f in files], return_tensors="pt")
    return bf["pixel_values"], bf["image_position_ids"], [int(n) for n in bf["num_soft_tokens_per_image"]]


def tiny_pixel_fixture():
    """The tiny models' pixel values (shared by the variants): real patches as uint8 levels; positions checked
    row-major (x fastest) here, so the fixture does not store them."""
    pv, pos, ntok = tiny_pixels(TINY_IMAGES)
    images = []
    for i, file in enumerate(TINY_IMAGES):
        n = int((pos[i, :, 0] >= 0).sum())
        p = pos[i, :n]
        pw, ph = int(p[:, 0].max()) + 1, int(p[:, 1].max()) + 1
        assert p.tolist() == [[x, y] for y in range(ph) for x in range(pw)], "row-major positions"
        assert torch.all(pos[i, n:] == -1) and torch.all(pv[i, n:] == 0), "padding"
        lv = pv[i, :n] * 255
        assert torch.allclose(lv, lv.round(), atol=1e-3)
        images.append({"file": file, "height": ph * 2, "width": pw * 2, "soft_tokens": ntok[i],
                       "levels": lv.round().to(torch.int64).flatten().tolist()})
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "pixels.json"), "w") as f:
        json.dump({"processor": "Gemma4ImageProcessor(patch_size=2, max_soft_tokens=70, pooling_kernel_size=3)",
                   "layout": "levels: the real patches [n, 2*2*3] (y, x, c), round(x * 255), padding dropped",
                   "max_patches": int(pv.shape[1]), "images": images}, f, separators=(",", ":"))
        f.write("\n")


def run_unified():
    """The 12B-like encoder-free model (Gemma4UnifiedForConditionalGeneration): merged 6x6x3 patches (patch 2,
    pooling 3) -> LayerNorm, dense, LayerNorm, + factorized positions, LayerNorm -> embed_vision."""
    import transformers
    from transformers import (Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration,
                              Gemma4UnifiedTextConfig, Gemma4UnifiedVisionConfig)
    from transformers.models.gemma4_unified.image_processing_gemma4_unified import Gemma4UnifiedImageProcessor

    out = os.path.join(OUT, "unified")
    os.makedirs(out, exist_ok=True)
    tk = {k: v for k, v in TEXT.items() if k != "hidden_size_per_layer_input"}
    text = Gemma4UnifiedTextConfig(**tk, num_hidden_layers=4, num_key_value_heads=2, layer_types=[S, S, F, F],
                                   sliding_window=4, global_head_dim=32, num_global_key_value_heads=1,
                                   attention_k_eq_v=True)
    vision = Gemma4UnifiedVisionConfig(patch_size=2, pooling_kernel_size=3, mm_embed_dim=24, mm_posemb_size=40,
                                       rms_norm_eps=1e-6, output_proj_dims=24)
    cfg = Gemma4UnifiedConfig(text_config=text, vision_config=vision, audio_config=None, image_token_id=IMG,
                              boi_token_id=BOI, eoi_token_id=EOI, video_token_id=63, audio_token_id=59)
    torch.manual_seed(SEED)
    model = Gemma4UnifiedForConditionalGeneration(cfg).float()
    g = torch.Generator().manual_seed(SEED + 99)
    with torch.no_grad():
        for name, p in model.named_parameters():
            last = name.split(".")[-2]
            if last.endswith("norm") or last.endswith(("ln1", "ln2")):
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                else:
                    p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.3)
            elif name.endswith("pos_embedding") or "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            else:
                raise RuntimeError(f"unexpected parameter {name} {tuple(p.shape)}")
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    model.eval().to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(out, extra)):
            os.remove(os.path.join(out, extra))
    with open(os.path.join(out, "processor_config.json"), "w") as f:
        json.dump({"image_processor": {"image_processor_type": "Gemma4UnifiedImageProcessor", "max_soft_tokens": 70,
                                       "patch_size": 2, "pooling_kernel_size": 3}}, f, indent=2)
        f.write("\n")
    m = Gemma4UnifiedForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    t = m.model.language_model.embed_tokens
    t.embed_scale.fill_(float(torch.tensor(float(t.scalar_embed_scale)).to(torch.bfloat16)))
    proc = Gemma4UnifiedImageProcessor(patch_size=2, max_soft_tokens=70, pooling_kernel_size=3)
    bf = proc(images=[load(f) for f in TINY_IMAGES], return_tensors="pt")
    pv, pos = bf["pixel_values"], bf["image_position_ids"]
    ntok = [int(n) for n in bf["num_soft_tokens_per_image"]]
    # The merged patches are the 6x6x3 (y, x, c) blocks of the same resized image as the tower models'.
    tpv, tpos, tn = tiny_pixels(TINY_IMAGES)
    assert ntok == tn, (ntok, tn)
    for i, n in enumerate(ntok):
        p = pos[i, :n]
        w, h = int(p[:, 0].max()) + 1, int(p[:, 1].max()) + 1
        assert p.tolist() == [[x, y] for y in range(h) for x in range(w)], "row-major merged positions"
        small = unpatch(tpv[i], n * 9, h * 3, w * 3, 2)
        assert torch.equal(unpatch(pv[i], n, h, w, 6), small), "merged patches = 6x6 blocks"
    g = torch.Generator().manual_seed(SEED + 7)
    txt = lambda k: torch.randint(3, 59, (k,), generator=g).tolist()
    ids = [2] + txt(4)
    for n in ntok:
        ids += [BOI] + [IMG] * n + [EOI] + txt(3)
    x = torch.tensor([ids])
    with torch.no_grad():
        feats = torch.cat(m.model.get_image_features(pv, pos, return_dict=True).pooler_output)
        lg = m(input_ids=x, pixel_values=pv, image_position_ids=pos, mm_token_type_ids=(x == IMG).long(),
               use_cache=False).logits[0].float()
        lg_causal = m(input_ids=x, pixel_values=pv, image_position_ids=pos, use_cache=False).logits[0].float()
        seq = list(ids)
        for _ in range(N_GREEDY):
            s_ = torch.tensor([seq])
            nxt = m(input_ids=s_, pixel_values=pv, image_position_ids=pos, mm_token_type_ids=(s_ == IMG).long(),
                    use_cache=False).logits[0, -1]
            seq.append(int(nxt.argmax()))
    diff = float((lg - lg_causal).abs().max())
    assert diff > 1.0, diff
    print(f"unified: {len(ids)} tokens, soft tokens {ntok}; logits range [{lg.min():.2f}, {lg.max():.2f}], "
          f"max |mask on - off| {diff:.4f}; greedy {seq[len(ids):]}")
    r = lambda t, d: [round(float(v), d) for v in t.flatten().tolist()]
    doc = {
        "transformers_version": transformers.__version__, "torch_version": torch.__version__, "seed": SEED,
        "variant": "unified", "attn_implementation": "eager",
        "dtype": "weights bfloat16 (stored), computed in float32 with bf16 embedding scales",
        "image_token_id": IMG, "boi_token_id": BOI, "eoi_token_id": EOI, "pad_token_id": 0,
        "images": TINY_IMAGES, "soft_tokens": ntok, "input_ids": ids,
        "image_features": r(feats, 5), "logits": r(lg, 4),
        "greedy": seq[len(ids):],
    }
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    for fn in sorted(os.listdir(out)):
        print(f"  unified/{fn}: {os.path.getsize(os.path.join(out, fn))} bytes")


def main():
    torch.set_num_threads(1)
    pixel_fixture()
    tiny_pixel_fixture()
    for v in VARIANTS:
        run_variant(v)
    run_unified()


if __name__ == "__main__":
    main()
