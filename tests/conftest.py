"""Shared fixtures: a tiny ImageNet-layout dataset of real JPEG files."""
import os

import numpy
import pytest
from PIL import Image, ImageDraw


def make_tiny_dataset(root, train_per_class=10, val_per_class=4, seed=0):
    """3 classes of 28x24 JPEGs (a disc, a bar, a cross) in train/ and val/."""
    rng = numpy.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(["n001", "n002", "n003"]):
            os.makedirs(os.path.join(root, split, name))
            for i in range(n):
                img = Image.new("RGB", (28, 24), tuple(int(v) for v in rng.integers(0, 80, 3)))
                d = ImageDraw.Draw(img)
                x, y = rng.integers(6, 18), rng.integers(6, 14)
                if c == 0:
                    d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=(250, 200, 0))
                elif c == 1:
                    d.rectangle([2, y - 2, 26, y + 2], fill=(0, 200, 250))
                else:
                    d.line([x - 6, y, x + 6, y], fill=(250, 250, 250), width=3)
                    d.line([x, y - 6, x, y + 6], fill=(250, 250, 250), width=3)
                img.save(os.path.join(root, split, name, f"img_{i}.JPEG"), quality=90)
    return root


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """3 classes x 10 train / 4 val images."""
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))
