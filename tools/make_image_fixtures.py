#!/usr/bin/env python3
"""Generate tests/fixtures/images/: small test images and what transformers' Gemma 3 processor makes of them.

The images (gradients and shapes, a few KB each) are drawn with PIL in several sizes, aspect ratios, modes and
formats: an upscaled RGB PNG, a downscaled 4:2:0 JPEG, a 4:4:4 JPEG, an RGBA PNG with transparency (composited
onto white), a grayscale PNG and a lossless WebP.

The reference is the image processor AutoImageProcessor picks in transformers 5.23 for gemma-3-4b-it's
preprocessor_config.json (reproduced below): with torchvision installed that is `Gemma3ImageProcessor`, the
torchvision backend (uint8 CHW tensor, `tvF.resize(..., BILINEAR, antialias=True)`, then rescale and normalize in
float32); without torchvision it is `Gemma3ImageProcessorPil`. The summary records which class was used and the
largest difference between the two backends.

pixels.json, per image: file, width, height, class, the per-channel mean of the 896x896 pixel values, and a strided
subsample (rows and columns 0, 37, 74, ...: 25x25 per channel) as uint8 levels `round((x + 1) * 127.5)` (the
values are exactly `2 * level / 255 - 1`).

Usage: PYTHONPATH=<dir with torchvision and pillow> /tmp/oracle/bin/python tools/make_image_fixtures.py
(torchvision 0.29.2 and pillow 13.0.0 were used; pip install --target DIR torchvision pillow --no-deps).
"""
import json
import os
import tempfile

import numpy as np
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "images")
STRIDE = 37

PREPROCESSOR_CONFIG = {
    "do_convert_rgb": None,
    "do_normalize": True,
    "do_pan_and_scan": None,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "Gemma3ImageProcessor",
    "image_seq_length": 256,
    "image_std": [0.5, 0.5, 0.5],
    "pan_and_scan_max_num_crops": None,
    "pan_and_scan_min_crop_size": None,
    "pan_and_scan_min_ratio_to_activate": None,
    "processor_class": "Gemma3Processor",
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 896, "width": 896},
}


def gradient(w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    a, b, c = rng.uniform(0.5, 2.0, 3)
    r = 127.5 + 127.5 * np.sin(a * x / w * 3.0 + b)
    g = 255.0 * y / max(h - 1, 1)
    bl = 127.5 + 127.5 * np.cos(c * (x + y) / (w + h) * 5.0)
    return np.stack([r, g, bl], -1).round().clip(0, 255).astype(np.uint8)


def shapes(img, seed):
    rng = np.random.default_rng(seed + 100)
    d = ImageDraw.Draw(img)
    w, h = img.size
    for i in range(6):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        x1, y1 = x0 + rng.integers(4, w // 2 + 5), y0 + rng.integers(4, h // 2 + 5)
        col = tuple(int(v) for v in rng.integers(0, 256, len(img.getbands())))
        if i % 2:
            d.ellipse([x0, y0, x1, y1], fill=col)
        else:
            d.rectangle([x0, y0, x1, y1], fill=col)
    d.line([0, 0, w - 1, h - 1], fill=tuple([255] * len(img.getbands())), width=3)
    return img


def make_images():
    os.makedirs(OUT, exist_ok=True)
    made = []
    img = shapes(Image.fromarray(gradient(160, 120, 1)), 1)
    img.save(os.path.join(OUT, "grad_160x120.png"))
    made.append("grad_160x120.png")
    img = shapes(Image.fromarray(gradient(240, 960, 2)), 2)
    img.save(os.path.join(OUT, "tall_240x960.jpg"), quality=85)  # 4:2:0
    made.append("tall_240x960.jpg")
    img = shapes(Image.fromarray(gradient(640, 400, 3)), 3)
    img.save(os.path.join(OUT, "wide_640x400_444.jpg"), quality=90, subsampling=0)
    made.append("wide_640x400_444.jpg")
    rgba = np.concatenate([gradient(96, 64, 4), np.zeros((64, 96, 1), np.uint8)], -1)
    yy, xx = np.mgrid[0:64, 0:96]
    rgba[..., 3] = (255 * xx / 95).round().astype(np.uint8)
    rgba[:8, :, 3] = 0
    rgba[-8:, :, 3] = 255
    img = shapes(Image.fromarray(rgba, "RGBA"), 4)
    img.save(os.path.join(OUT, "alpha_96x64.png"))
    made.append("alpha_96x64.png")
    img = shapes(Image.fromarray(gradient(200, 200, 5)[..., 1]), 5)
    img.save(os.path.join(OUT, "gray_200x200.png"))
    made.append("gray_200x200.png")
    img = shapes(Image.fromarray(gradient(900, 240, 6)), 6)
    img.save(os.path.join(OUT, "wide_900x240.webp"), lossless=True)
    made.append("wide_900x240.webp")
    return made


def main():
    from transformers import AutoImageProcessor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    files = make_images()
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "preprocessor_config.json"), "w") as f:
            json.dump(PREPROCESSOR_CONFIG, f)
        proc = AutoImageProcessor.from_pretrained(d)
        pil_proc = Gemma3ImageProcessorPil(**{k: v for k, v in PREPROCESSOR_CONFIG.items()
                                             if k not in ("image_processor_type", "processor_class")})
    out = {"processor": type(proc).__name__, "stride": STRIDE, "images": []}
    for name in files:
        im = Image.open(os.path.join(OUT, name))
        px = proc(images=im, do_convert_rgb=True, return_tensors="pt")["pixel_values"][0].double().numpy()
        px_pil = pil_proc(images=Image.open(os.path.join(OUT, name)),
                          do_convert_rgb=True, return_tensors="np")["pixel_values"][0].astype(np.float64)
        assert px.shape == (3, 896, 896), px.shape
        levels = np.round((px + 1.0) * 127.5)
        assert np.abs(levels / 127.5 - 1.0 - px).max() < 1e-6, "values are not uint8 levels"
        sub = levels[:, ::STRIDE, ::STRIDE].astype(int)
        out["images"].append({
            "file": name,
            "width": im.size[0],
            "height": im.size[1],
            "mode": im.mode,
            "mean": [float(px[c].mean()) for c in range(3)],
            "levels_sum": [int(levels[c].sum()) for c in range(3)],
            "max_abs_diff_pil_backend": float(np.abs(px - px_pil).max()),
            "subsample": sub.tolist(),
        })
        print(name, im.size, im.mode, "mean", out["images"][-1]["mean"],
              "pil-backend max diff", out["images"][-1]["max_abs_diff_pil_backend"],
              "bytes", os.path.getsize(os.path.join(OUT, name)))
    with open(os.path.join(OUT, "pixels.json"), "w") as f:
        json.dump(out, f, separators=(",", ":"))
    print("processor:", out["processor"])


def prompt_cases():
    """prompt_ids.json: Gemma3Processor's input_ids and token_type_ids for two prompts with two images each,
    with the real Gemma 3 tokenizer (models/gemma-3-270m, fetched by scripts/setup.sh)."""
    from transformers import AutoTokenizer
    from transformers.models.gemma3.image_processing_gemma3 import Gemma3ImageProcessor
    from transformers.models.gemma3.processing_gemma3 import Gemma3Processor

    tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, "models", "gemma-3-270m"))
    kw = {k: v for k, v in PREPROCESSOR_CONFIG.items() if k not in ("image_processor_type", "processor_class")}
    proc = Gemma3Processor(image_processor=Gemma3ImageProcessor(**kw), tokenizer=tok, image_seq_length=256)
    img = Image.open(os.path.join(OUT, "grad_160x120.png"))
    cases = []
    for text in ["<start_of_turn>user\n<start_of_image><start_of_image>Describe both.<end_of_turn>\n"
                 "<start_of_turn>model\n",
                 "Look:<start_of_image>\n\nand\n<start_of_image> done"]:
        out = proc(text=text, images=[img, img], return_tensors="np")
        cases.append({"text": text, "ids": out["input_ids"][0].tolist(),
                      "token_type_ids": out["token_type_ids"][0].tolist()})
    with open(os.path.join(OUT, "prompt_ids.json"), "w") as f:
        json.dump({"tokenizer": "gemma-3-270m", "cases": cases}, f, separators=(",", ":"))


if __name__ == "__main__":
    main()
    prompt_cases()
