"""A small procedurally drawn dataset in the ImageNet layout, for demos and tests.

    path = ensure_demo_dataset()      # ~/.cache/minitorch_gx/demo_shapes_v1
    # path/train/<class>/*.JPEG, path/val/<class>/*.JPEG, path/{train,val}_list.txt

Ten classes of shapes and textures (checker, circle, crescent, cross, dots,
rings, square, star, stripes, triangle), each drawn with a random colour,
position, size and rotation over a random gradient background with noise, and
saved as real JPEG files, so the whole input pipeline (decode, crop, jitter)
runs as it does on ImageNet. Image k of a class is drawn from a generator
seeded by (seed, split, class, k): the dataset is the same on every machine.

The cache folder is ``$MINITORCH_GX_CACHE`` or ``~/.cache/minitorch_gx``. The
dataset is generated in a temporary folder and renamed into place when
complete, so an interrupted run never leaves half a dataset behind.

    python -m resnext.demo_data [--root PATH]   # generate (if needed) and print the path
"""
import argparse
import math
import os
import shutil
import sys
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from .dataset import DataError

NAME = "demo_shapes_v1"
CLASSES = ("checker", "circle", "crescent", "cross", "dots",
           "rings", "square", "star", "stripes", "triangle")
_INFO_FILE = "DATASET_INFO.txt"
_SUPERSAMPLE = 2  # draw at 2x and average 2x2 blocks: cheap antialiasing


def default_root():
    cache = os.environ.get("MINITORCH_GX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "minitorch_gx")
    return os.path.join(cache, NAME)


# ---------------------------------------------------------------------------
# Masks: float (H, W) in [0, 1], 1 where the foreground colour goes
# ---------------------------------------------------------------------------
def _polygon(points, n):
    mask = Image.new("L", (n, n), 0)
    ImageDraw.Draw(mask).polygon([(float(x), float(y)) for x, y in points], fill=255)
    return np.asarray(mask, np.float32) / 255


def _star_points(cx, cy, r, angle, tips, inner):
    """Polygon alternating between radius r (tips) and r * inner."""
    k = np.arange(2 * tips)
    radius = np.where(k % 2 == 0, r, r * inner)
    theta = angle + np.pi * k / tips
    return np.stack([cx + radius * np.cos(theta), cy + radius * np.sin(theta)], 1)


def _cross_points(cx, cy, r, angle):
    a, b = r, r * 0.35  # arm half-length, half-width
    pts = np.array([(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b),
                    (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)])
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]]) + (cx, cy)


def _shape_mask(name, n, rng):
    """Mask of class ``name`` on an n x n canvas."""
    cx, cy = rng.uniform(0.3, 0.7, size=2) * n
    r = rng.uniform(0.18, 0.38) * n
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    u = (x - cx) * math.cos(angle) + (y - cy) * math.sin(angle)  # rotated coordinates
    v = -(x - cx) * math.sin(angle) + (y - cy) * math.cos(angle)
    dist = np.hypot(x - cx, y - cy)
    disc = dist < r
    period = rng.uniform(0.12, 0.25) * n  # of the textures
    if name == "circle":
        return disc.astype(np.float32)
    if name == "crescent":
        off = rng.uniform(0.35, 0.6) * r
        bite = np.hypot(x - cx - off * math.cos(angle), y - cy - off * math.sin(angle)) < r * 0.9
        return (disc & ~bite).astype(np.float32)
    if name == "rings":
        return (disc & ((dist / (r / 3.5)) % 1 < 0.5)).astype(np.float32)
    if name == "square":
        return _polygon(_star_points(cx, cy, r, angle, 2, 1.0), n)
    if name == "triangle":
        k = np.arange(3)
        pts = np.stack([cx + r * np.cos(angle + 2 * np.pi * k / 3), cy + r * np.sin(angle + 2 * np.pi * k / 3)], 1)
        return _polygon(pts, n)
    if name == "star":
        return _polygon(_star_points(cx, cy, r, angle, 5, 0.45), n)
    if name == "cross":
        return _polygon(_cross_points(cx, cy, r, angle), n)
    patch = (np.abs(u) < r) & (np.abs(v) < r)  # textures fill a rotated square patch
    if name == "stripes":
        return (patch & ((u / period) % 1 < 0.5)).astype(np.float32)
    if name == "checker":
        return (patch & ((np.floor(u / period) + np.floor(v / period)) % 2 == 0)).astype(np.float32)
    if name == "dots":
        du, dv = (u / period) % 1 - 0.5, (v / period) % 1 - 0.5
        return (patch & (du * du + dv * dv < 0.09)).astype(np.float32)
    raise ValueError(f"unknown demo class {name!r}")


def draw_image(name, size, rng):
    """One uint8 (size, size, 3) image of class ``name``."""
    n = size * _SUPERSAMPLE
    mask = _shape_mask(name, n, rng)
    mask = mask.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))  # (size, size)
    bg0, bg1 = rng.uniform(0, 255, size=(2, 3))
    fg = rng.uniform(0, 255, size=3)
    while np.abs(fg - (bg0 + bg1) / 2).mean() < 60:  # keep the shape visible
        fg = rng.uniform(0, 255, size=3)
    t = np.linspace(0, 1, size, dtype=np.float32)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = np.clip(0.5 + (t[None, :] - 0.5) * math.cos(direction)
                   + (t[:, None] - 0.5) * math.sin(direction), 0, 1)  # (size, size)
    bg = bg0 + ramp[:, :, None] * (bg1 - bg0)  # (size, size, 3)
    image = bg + mask[:, :, None] * (fg - bg)
    image += rng.normal(0, rng.uniform(2, 15), size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------
# Writing the dataset
# ---------------------------------------------------------------------------
def _write_split(folder, split, split_id, count, size, seed):
    lines = []
    for label, name in enumerate(CLASSES):
        os.makedirs(os.path.join(folder, split, name))
        for k in range(count):
            rng = np.random.default_rng((seed, split_id, label, k))
            rel = f"{name}/{name}_{k:04d}.JPEG"
            Image.fromarray(draw_image(name, size, rng)).save(
                os.path.join(folder, split, rel), quality=90)
            lines.append(f"{rel} {label}\n")
    with open(os.path.join(folder, f"{split}_list.txt"), "w") as f:
        f.writelines(lines)


def generate(folder, n_train=300, n_val=50, image_size=64, seed=0):
    """Write the dataset into ``folder`` (which must not exist yet), non-atomically."""
    os.makedirs(folder)
    _write_split(folder, "train", 0, n_train, image_size, seed)
    _write_split(folder, "val", 1, n_val, image_size, seed)
    with open(os.path.join(folder, _INFO_FILE), "w") as f:
        f.write(f"{NAME}: procedurally drawn shapes (resnext.demo_data)\n"
                f"classes={','.join(CLASSES)} n_train={n_train} n_val={n_val} "
                f"image_size={image_size} seed={seed}\n")


def ensure_demo_dataset(root=None, n_train=300, n_val=50, image_size=64, seed=0):
    """Path of the demo dataset (with train/ and val/), generating it on first use.

    Generation goes to a temporary sibling folder that is renamed to ``root``
    only when complete. If another process finishes first, its copy is used.
    """
    root = os.path.abspath(os.fspath(root) if root is not None else default_root())
    if os.path.exists(root):
        if not os.path.isfile(os.path.join(root, _INFO_FILE)):
            raise DataError(f"{root} exists but is not a generated demo dataset; "
                            f"remove it or pass another root")
        return root
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.partial-", dir=parent)
    try:
        generate(os.path.join(tmp, "data"), n_train, n_val, image_size, seed)
        try:
            os.rename(os.path.join(tmp, "data"), root)
        except OSError:
            if not os.path.isfile(os.path.join(root, _INFO_FILE)):
                raise  # not a lost race: a real failure
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate the demo shapes dataset (if needed) and print its path.")
    parser.add_argument("--root", default=None, help=f"folder to create (default {default_root()})")
    args = parser.parse_args(argv)
    try:
        print(ensure_demo_dataset(args.root))
    except (DataError, OSError) as e:
        sys.exit(f"demo_data: error: {e}")


if __name__ == "__main__":
    main()
