#!/usr/bin/env python3
"""Generate tests/fixtures/tiny-gemma3-vision/: a tiny random Gemma3ForConditionalGeneration (SigLIP tower +
projector + text model) and what transformers computes with it.

Shapes: vision hidden 16, 2 layers, 2 heads (head_dim 8), image_size 32, patch_size 8 (4x4 = 16 patches),
mm_tokens_per_image 4 (2x2 average pool); text hidden 32, 3 layers (sliding, sliding, full), sliding window 3 (smaller
than an image, so the window bounds the image block on sliding layers), vocab 64 with boi 58, eoi 59, image token 60.
Weights are re-drawn from a fixed seed at scales that keep every part non-trivial (norm weights ~N(0, 0.5),
matrices ~1/sqrt(fan_in), biases ~N(0, 0.2), positions ~N(0, 0.5)); saved as float32 (about 150 KB).

The pixel values come from tests/fixtures/images (grad_160x120.png, alpha_96x64.png) through
Gemma3ImageProcessor at 32x32 (the tiny image_size), so they also check the preprocessing at another size.

reference.json:
  input_ids            the prompt: two images, each  boi, 4 x image token, eoi
  token_type_ids       1 at image tokens
  pixel_values         [2, 3, 32, 32]
  image_features       [2, 4, 32]   get_image_features(...).pooler_output (projector output)
  vision_last_hidden   [2, 16, 16]  the tower's last_hidden_state (after post_layernorm)
  logits               [T, 64]      float32 logits of every prompt position (token_type_ids given: image mask on)
  logits_causal        [T, 64]      the same without token_type_ids (plain causal: the mask off)
  greedy               8 greedy tokens generated after the prompt (generate, do_sample=False)

Usage: PYTHONPATH=<dir with torchvision and pillow> /tmp/oracle/bin/python tools/make_tiny_gemma3_vision.py
"""
import json
import math
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "tiny-gemma3-vision")
SEED = 4321
BOI, EOI, IMG = 58, 59, 60


def make_model():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    cfg = Gemma3Config(
        text_config=dict(
            model_type="gemma3_text", vocab_size=64, hidden_size=32, intermediate_size=48,
            num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            query_pre_attn_scalar=16, sliding_window=3,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            max_position_embeddings=128, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2,
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=2, num_channels=3, image_size=32, patch_size=8, layer_norm_eps=1e-6,
            vision_use_head=False,
        ),
        mm_tokens_per_image=4, boi_token_index=BOI, eoi_token_index=EOI, image_token_index=IMG,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = Gemma3ForConditionalGeneration(cfg).float().eval()
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mm_input_projection_weight"):
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[0]))
            elif "norm" in name and name.endswith("weight") and "layer_norm" not in name \
                    and "post_layernorm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)  # Gemma RMSNorm: (1 + w)
            elif "layer_norm" in name or "post_layernorm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + torch.randn(p.shape, generator=g) * 0.3)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "position_embedding" in name or "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return model


def main():
    from PIL import Image
    from transformers.models.gemma3.image_processing_gemma3 import Gemma3ImageProcessor

    os.makedirs(OUT, exist_ok=True)
    model = make_model()
    model.save_pretrained(OUT, safe_serialization=True)
    proc = Gemma3ImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                resample=2, rescale_factor=1 / 255, do_convert_rgb=True)
    imgs = [Image.open(os.path.join(ROOT, "tests", "fixtures", "images", f))
            for f in ("grad_160x120.png", "alpha_96x64.png")]
    pixel_values = proc(images=imgs, return_tensors="pt")["pixel_values"].float()
    image = [BOI] + [IMG] * 4 + [EOI]
    ids = [2, 5, 17] + image + [9, 33, 41] + image + [7, 21, 3]
    input_ids = torch.tensor([ids])
    token_type_ids = (input_ids == IMG).long()
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values)
        vision_last = feats.last_hidden_state
        image_features = feats.pooler_output
        logits = model(input_ids=input_ids, pixel_values=pixel_values, token_type_ids=token_type_ids).logits[0]
        logits_causal = model(input_ids=input_ids, pixel_values=pixel_values).logits[0]
        gen = model.generate(input_ids=input_ids, pixel_values=pixel_values, token_type_ids=token_type_ids,
                             attention_mask=torch.ones_like(input_ids), do_sample=False, max_new_tokens=8,
                             min_new_tokens=8, eos_token_id=None, pad_token_id=0)
    greedy = gen[0, len(ids):].tolist()
    diff = (logits - logits_causal).abs().max().item()
    print("image features", tuple(image_features.shape), "max|logits - causal logits|", diff, "greedy", greedy)
    assert diff > 1e-2, "the image mask must change the logits"
    r = lambda t: [round(float(v), 7) for v in t.flatten().tolist()]
    ref = {
        "input_ids": ids,
        "token_type_ids": token_type_ids[0].tolist(),
        "pixel_values": r(pixel_values),
        "image_features": r(image_features),
        "vision_last_hidden": r(vision_last),
        "logits": r(logits),
        "logits_causal": r(logits_causal),
        "greedy": greedy,
    }
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(ref, f, separators=(",", ":"))
    for f in sorted(os.listdir(OUT)):
        print(f, os.path.getsize(os.path.join(OUT, f)))


if __name__ == "__main__":
    main()
