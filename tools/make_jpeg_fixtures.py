#!/usr/bin/env python3
"""Generate tests/fixtures/jpeg/: small JPEGs and PIL's decoded pixels of them (issue #9: JPEG pixels equal to
transformers' processors, which decode with PIL).

The images (coloured shapes with sharp edges on a gradient, plus a little noise, so chroma upsampling and the IDCT
both matter) are drawn with PIL at odd sizes (partial MCUs) and saved with PIL's JPEG encoder in the layouts that
take different decoder paths: 4:2:0, 4:2:2, 4:4:4, progressive 4:2:0 and greyscale. A CMYK JPEG (unsupported by
e4m3: an error) is saved too, without pixels.

Per image `NAME.jpg`, `NAME.rgb` holds `np.asarray(Image.open(NAME.jpg).convert("RGB"))`: raw 8-bit RGB,
row-major, 3 bytes per pixel, as PIL decodes it (libjpeg-turbo, its default ISLOW IDCT and fancy upsampling).
decoded.json lists the files with width, height, mode, subsampling and progressive, plus the PIL and libjpeg-turbo
versions.

Usage: /tmp/oracle/bin/python tools/make_jpeg_fixtures.py   (pillow 13.0.0 with libjpeg-turbo 3.2.0 was used)
"""
import json
import os

import numpy as np
from PIL import Image, ImageDraw, JpegImagePlugin, features

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "jpeg")


def drawing(w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([255 * x / (w - 1), 255 * y / (h - 1), 128 + 100 * np.sin((x + y) / 5)], -1)
    base += rng.normal(0, 6, base.shape)
    img = Image.fromarray(base.round().clip(0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    d.ellipse([w * 0.1, h * 0.15, w * 0.6, h * 0.8], fill=(230, 20, 40))
    d.rectangle([w * 0.5, h * 0.05, w * 0.9, h * 0.45], fill=(20, 40, 220))
    d.line([0, h - 1, w - 1, 0], fill=(250, 240, 10), width=3)
    return img


# name, size, mode, save options
CASES = [
    ("yuv420_45x37", (45, 37), "RGB", dict(quality=85, subsampling=2)),
    ("yuv422_33x21", (33, 21), "RGB", dict(quality=85, subsampling=1)),
    ("yuv444_40x30", (40, 30), "RGB", dict(quality=90, subsampling=0)),
    ("progressive_420_53x29", (53, 29), "RGB", dict(quality=80, subsampling=2, progressive=True)),
    ("gray_31x17", (31, 17), "L", dict(quality=85)),
]


def main():
    os.makedirs(OUT, exist_ok=True)
    images = []
    for seed, (name, (w, h), mode, opts) in enumerate(CASES):
        path = os.path.join(OUT, name + ".jpg")
        drawing(w, h, seed).convert(mode).save(path, **opts)
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
            progressive = bool(im.info.get("progressive", 0))
            sub = JpegImagePlugin.get_sampling(im) if mode == "RGB" else None
        assert rgb.shape == (h, w, 3), rgb.shape
        assert progressive == bool(opts.get("progressive", False))
        rgb.tofile(os.path.join(OUT, name + ".rgb"))
        images.append(
            {
                "file": name + ".jpg",
                "rgb": name + ".rgb",
                "width": w,
                "height": h,
                "mode": mode,
                "subsampling": {0: "4:4:4", 1: "4:2:2", 2: "4:2:0", None: None}[sub],
                "progressive": progressive,
            }
        )
    drawing(16, 16, 99).convert("CMYK").save(os.path.join(OUT, "cmyk_16x16.jpg"), quality=85)
    summary = {
        "pillow": Image.__version__,
        "libjpeg_turbo": features.version("libjpeg_turbo"),
        "decode": 'np.asarray(Image.open(file).convert("RGB"))',
        "images": images,
        "unsupported": ["cmyk_16x16.jpg"],
    }
    with open(os.path.join(OUT, "decoded.json"), "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    for i in images:
        size = os.path.getsize(os.path.join(OUT, i["file"]))
        print(f'{i["file"]}: {i["width"]}x{i["height"]} {i["mode"]} {i["subsampling"]} progressive={i["progressive"]} {size} B')


if __name__ == "__main__":
    main()
