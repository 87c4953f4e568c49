"""Input pipeline throughput: decoded + augmented images per second for 1, 2, ... workers.

    python benchmarks/bench_data.py                         # the demo dataset (64x64 JPEGs)
    python benchmarks/bench_data.py --make_jpegs 400        # 500x375 JPEGs, like ImageNet's
    python benchmarks/bench_data.py --data_path imagenet/train --workers 1,2,4,8 --batches 30

For each worker count, the loader runs ``--repeats`` timed passes of
``--batches`` batches each (after one warm-up batch, which also starts the
workers) and the median images/s is reported, with the draft-decode and eval
transforms too when ``--mode all``. The ``--make_jpegs`` images are generated in
a temporary folder (removed afterwards) so that the reduced-size JPEG decode is
exercised as on ImageNet.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from resnext.dataset import DataError, ImageFolder  # noqa: E402
from resnext.demo_data import draw_image, ensure_demo_dataset, CLASSES  # noqa: E402
from resnext.loader import Loader  # noqa: E402


def make_jpegs(folder, count, width=500, height=375, seed=0):
    """``count`` photo-sized JPEGs (shapes drawn at 64 px, upscaled, plus fine noise)."""
    rng = np.random.default_rng(seed)
    for k in range(count):
        name = CLASSES[k % len(CLASSES)]
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        small = Image.fromarray(draw_image(name, 64, rng)).resize((width, height), Image.BICUBIC)
        pixels = np.asarray(small, np.int16) + rng.integers(-12, 13, (height, width, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            os.path.join(folder, name, f"{k:06d}.JPEG"), quality=90)
    return folder


def measure(dataset, args, workers, train):
    loader = Loader(dataset, args.batch_size, train=train, image_size=args.image_size,
                    num_workers=workers, seed=0)
    rates = []
    try:
        for rep in range(args.repeats):
            loader.set_epoch(rep)
            it = iter(loader)
            next(it)  # warm-up: worker start, page cache
            start, images = time.perf_counter(), 0
            for _, (x, _) in zip(range(args.batches), it):
                images += len(x)
            rates.append(images / (time.perf_counter() - start))
            it.close()
    finally:
        loader.close()
    return statistics.median(rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_path", default=None, help="ImageNet-style folder (default: demo dataset train split)")
    parser.add_argument("--make_jpegs", type=int, default=0, metavar="N",
                        help="benchmark N generated 500x375 JPEGs instead")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (0 = in-process)")
    parser.add_argument("--batches", type=int, default=10, help="timed batches per pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per setting (median)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--mode", choices=["train", "eval", "all"], default="train")
    args = parser.parse_args()

    tmp = None
    try:
        if args.make_jpegs:
            tmp = tempfile.mkdtemp(prefix="bench_jpegs_")
            t = time.perf_counter()
            root = make_jpegs(tmp, args.make_jpegs)
            print(f"generated {args.make_jpegs} 500x375 JPEGs in {time.perf_counter() - t:.1f} s")
        else:
            root = args.data_path or os.path.join(ensure_demo_dataset(), "train")
        dataset = ImageFolder(root)
        need = args.batch_size * (args.batches + 1)
        if len(dataset) < need:
            print(f"note: {len(dataset)} images < {need} per pass; passes wrap into a new epoch "
                  f"only as far as the dataset allows", file=sys.stderr)
        print(f"{dataset}; batch {args.batch_size}, size {args.image_size}, cpus {os.cpu_count()}")
        modes = ["train", "eval"] if args.mode == "all" else [args.mode]
        print(f"{'mode':>6} {'workers':>7} {'img/s':>9}")
        for mode in modes:
            for workers in [int(w) for w in args.workers.split(",")]:
                rate = measure(dataset, args, workers, mode == "train")
                print(f"{mode:>6} {workers:>7} {rate:9.1f}", flush=True)
    except (DataError, ValueError) as e:
        sys.exit(f"bench_data: error: {e}")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
