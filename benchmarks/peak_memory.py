"""Peak resident memory of CPU training steps of resnext50_32x4d, measured from outside.

    python benchmarks/peak_memory.py                     # batch 16, 224x224, 3 steps
    python benchmarks/peak_memory.py --tree /path/to/an/older/checkout

The steps run in a child process (train.py's step: uint8 batch normalised,
forward, label-smoothed cross-entropy, backward, SGD); the figure is the
child's peak resident set (``ru_maxrss`` from ``wait4``), so every byte the
process held counts: NumPy arrays, the BLAS's buffers, the allocator's
retained free memory. ``--tree`` runs another checkout's package instead,
to compare two versions with the same tool.
"""
import argparse
import os
import subprocess
import sys

CHILD = """
import sys, numpy
sys.path.insert(0, sys.argv[1])
import minitorch_gx as mt
from minitorch_gx.functional import cross_entropy
from minitorch_gx.optim import SGD
from resnext.model import build_model
from resnext.trainer import param_groups
from resnext.transforms import normalize
batch, size, steps = (int(v) for v in sys.argv[2:5])
rng = numpy.random.default_rng(0)
images = rng.integers(0, 256, (batch, size, size, 3), dtype=numpy.uint8)
labels = rng.integers(0, 1000, batch)
model = build_model("resnext50_32x4d", 1000, seed=0).train()
opt = SGD(param_groups(model, 1e-4), lr=0.01, momentum=0.9)
for _ in range(steps):
    opt.zero_grad()
    x = mt.Tensor(normalize(images, numpy, numpy.float32))
    cross_entropy(model(x), labels, label_smoothing=0.1).backward()
    opt.step()
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--tree", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."),
                   help="the checkout whose minitorch_gx and resnext to run")
    a = p.parse_args()
    tree = os.path.abspath(a.tree)
    if not os.path.isdir(os.path.join(tree, "minitorch_gx")):
        sys.exit(f"error: --tree {a.tree}: no minitorch_gx package there")
    child = subprocess.Popen([sys.executable, "-c", CHILD, tree, str(a.batch),
                              str(a.image_size), str(a.steps)], cwd=tree)
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        sys.exit(f"error: the training steps failed (status {status})")
    print(f"peak resident memory: {usage.ru_maxrss / 1024:.0f} MiB ({a.steps} steps, batch "
          f"{a.batch}, {a.image_size}x{a.image_size}, tree {tree})")


if __name__ == "__main__":
    main()
