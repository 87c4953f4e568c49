"""Time every CUDA kernel at ResNeXt50_32x4d's shapes, beside the same op in PyTorch.

    python benchmarks/bench_kernels.py                      # GPU, batch 128
    python benchmarks/bench_kernels.py --batch 256 --only conv bn
    python benchmarks/bench_kernels.py --emulate            # CPU emulator, tiny shapes

Each row: our time per call (ms), what it achieves -- TFLOP/s for the
convolutions (2 * N*K*Cg*R*S*P*Q flops), GB/s for the memory-bound ops, counting
the minimum traffic (every input read once, every output written once) -- the
same op through PyTorch in the same run (cuDNN, TF32 off, so both do float32
arithmetic) and the ratio ours / PyTorch (below 1: ours is faster). Our
1x1 convolutions are cuBLAS through CuPy; they are listed for completeness.
--emulate runs tiny shapes through the CPU emulator and PyTorch on the CPU: it
checks that this script works on a machine without a GPU, the times mean nothing.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minitorch_gx import backend  # noqa: E402
from minitorch_gx.cuda import conv as cuda_conv, elementwise as cuda_elementwise  # noqa: E402
from minitorch_gx.cuda import loss as cuda_loss, norm as cuda_norm  # noqa: E402
from minitorch_gx.cuda import pool as cuda_pool, sgd as cuda_sgd  # noqa: E402


# --------------------------------------------------------------------------
# Shapes. div shrinks channels (and groups, keeping channels per group) and
# image sizes, for --emulate.
# --------------------------------------------------------------------------
def conv_shapes(batch, div=1, sdiv=1):
    """(name, (N, C, H, W, K, groups, R, S, stride, padding))"""
    def hw(v):
        return max(3, v // sdiv)
    g = 32 // div
    rows = [("stem 7x7/2", (batch, 3, hw(224), hw(224), 64 // div, 1, 7, 7, 2, 3))]
    for name, c, h, stride in [("layer1 3x3", 128, 56, 1), ("layer2.0 3x3/2", 256, 56, 2),
                               ("layer2 3x3", 256, 28, 1), ("layer3.0 3x3/2", 512, 28, 2),
                               ("layer3 3x3", 512, 14, 1), ("layer4.0 3x3/2", 1024, 14, 2),
                               ("layer4 3x3", 1024, 7, 1)]:
        rows.append((f"{name} g{g}", (batch, c // div, hw(h), hw(h), c // div, g, 3, 3, stride, 1)))
    rows += [("layer1 1x1 256->128 (cuBLAS)",
              (batch, 256 // div, hw(56), hw(56), 128 // div, 1, 1, 1, 1, 0)),
             ("layer2 downsample 1x1/2 (cuBLAS)",
              (batch, 256 // div, hw(56), hw(56), 512 // div, 1, 1, 1, 2, 0))]
    return rows


def bn_shapes(batch, div=1, sdiv=1):
    def hw(v):
        return max(2, v // sdiv)
    return [("stem bn1+relu", (batch, 64 // div, hw(112), hw(112)), True),
            ("layer1 bn1+relu", (batch, 128 // div, hw(56), hw(56)), True),
            ("layer1 bn3", (batch, 256 // div, hw(56), hw(56)), False),
            ("layer3 bn2+relu", (batch, 512 // div, hw(14), hw(14)), True),
            ("layer4 bn3", (batch, 2048 // div, hw(7), hw(7)), False)]


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------
class Clock:
    """Milliseconds per call: CUDA events on the GPU, wall time on the CPU."""

    def __init__(self, gpu, min_time=0.2):
        self.gpu, self.min_time = gpu, min_time

    def ours(self, fn):
        cupy = backend.cupy
        if not self.gpu:
            return self._wall(fn, lambda: None)
        fn()
        cupy.cuda.Device().synchronize()
        reps = self._reps(fn, cupy.cuda.Device().synchronize)
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return cupy.cuda.get_elapsed_time(start, end) / reps

    def torch(self, fn):
        import torch
        if not self.gpu:
            return self._wall(fn, lambda: None)
        fn()
        torch.cuda.synchronize()
        reps = self._reps(fn, torch.cuda.synchronize)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps

    def _reps(self, fn, sync):
        t0 = time.perf_counter()
        fn()
        sync()
        once = max(time.perf_counter() - t0, 1e-6)
        return int(min(200, max(3, self.min_time / once)))

    def _wall(self, fn, sync):
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1000


def load_torch(gpu):
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None, None
    if gpu:
        if not torch.cuda.is_available():
            return None, None
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    return torch, F


# --------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------
def bench_conv(args, xp, clock, torch, F, rows):
    dev = "cuda" if args.gpu else "cpu"
    for name, (n, c, h, w, k, g, r, s, stride, pad) in conv_shapes(args.batch, args.div, args.sdiv):
        rng = numpy.random.default_rng(0)
        x_h = rng.standard_normal((n, c, h, w)).astype(numpy.float32)
        W_h = rng.standard_normal((k, c // g, r, s)).astype(numpy.float32)
        p, q = (h + 2 * pad - r) // stride + 1, (w + 2 * pad - s) // stride + 1
        gy_h = rng.standard_normal((n, k, p, q)).astype(numpy.float32)
        x, W, gy = xp.asarray(x_h), xp.asarray(W_h), xp.asarray(gy_h)
        flops = 2.0 * n * k * (c // g) * r * s * p * q
        geo = (stride, pad, g)
        ours = {"forward": lambda: cuda_conv.conv2d_forward(x, W, *geo),
                "backward data": lambda: cuda_conv.conv2d_backward_data(gy, W, x.shape, *geo),
                "backward weight": lambda: cuda_conv.conv2d_backward_weight(gy, x, W.shape, *geo)}
        theirs = {}
        if torch is not None:
            tx, tW, tgy = (torch.from_numpy(a).to(dev) for a in (x_h, W_h, gy_h))
            tgeo = (stride, pad, 1, g)  # stride, padding, dilation, groups
            theirs = {"forward": lambda: F.conv2d(tx, tW, None, *tgeo),
                      "backward data": lambda: torch.nn.grad.conv2d_input(tx.shape, tW, tgy, *tgeo),
                      "backward weight": lambda: torch.nn.grad.conv2d_weight(tx, tW.shape, tgy,
                                                                             *tgeo)}
        for part, fn in ours.items():
            add_row(rows, "conv", f"{name} {part}", (n, c, h, w), clock.ours(fn),
                    theirs.get(part) and clock.torch(theirs[part]), flops=flops)


def bench_bn(args, xp, clock, torch, F, rows):
    dev = "cuda" if args.gpu else "cpu"
    for name, shape, relu in bn_shapes(args.batch, args.div, args.sdiv):
        c = shape[1]
        rng = numpy.random.default_rng(1)
        x_h = rng.standard_normal(shape).astype(numpy.float32)
        gy_h = rng.standard_normal(shape).astype(numpy.float32)
        gamma, beta = xp.ones(c, xp.float32), xp.zeros(c, xp.float32)
        x, gy = xp.asarray(x_h), xp.asarray(gy_h)
        # the running statistics are updated inside the forward (bn_fwd_reduce), as torch's are
        rm_ours, rv_ours = xp.zeros(c, xp.float32), xp.ones(c, xp.float32)
        _, mean, invstd = cuda_norm.batch_norm_train_forward(x, gamma, beta, 1e-5, relu,
                                                             rm_ours, rv_ours, 0.1)
        nbytes = 2 * x_h.nbytes  # forward: x in, y out; backward: gy, x in, gx out
        ours_f = clock.ours(lambda: cuda_norm.batch_norm_train_forward(
            x, gamma, beta, 1e-5, relu, rm_ours, rv_ours, 0.1))
        ours_b = clock.ours(lambda: cuda_norm.batch_norm_backward(gy, x, gamma, beta, mean,
                                                                  invstd, relu))
        torch_f = torch_fb = None
        if torch is not None:
            tx = torch.from_numpy(x_h).to(dev).requires_grad_(True)
            tgy = torch.from_numpy(gy_h).to(dev)
            tw = torch.ones(c, device=dev, requires_grad=True)
            tb = torch.zeros(c, device=dev, requires_grad=True)
            rm, rv = torch.zeros(c, device=dev), torch.ones(c, device=dev)

            def forward():
                out = F.batch_norm(tx, rm, rv, tw, tb, training=True, momentum=0.1, eps=1e-5)
                return F.relu(out) if relu else out

            def forward_backward():
                torch.autograd.grad(forward(), (tx, tw, tb), tgy)

            with torch.no_grad():
                torch_f = clock.torch(forward)
            torch_fb = clock.torch(forward_backward)
        add_row(rows, "batch norm", f"{name} train forward", shape, ours_f, torch_f, nbytes=nbytes)
        add_row(rows, "batch norm", f"{name} forward+backward", shape, ours_f + ours_b, torch_fb,
                nbytes=nbytes + 3 * x_h.nbytes)


def bench_sgd(args, xp, clock, torch, F, rows):
    n = 25_028_904 // (args.div * args.div)  # resnext50_32x4d's parameter count
    split = n - 53 * 2 * 1024 // args.div    # ~ the batch-norm parameters: no weight decay
    rng = numpy.random.default_rng(2)
    p, g = (xp.asarray(rng.standard_normal(n, numpy.float32)) for _ in range(2))
    buf = xp.zeros(n, xp.float32)
    ends = xp.asarray(numpy.array([split, n], numpy.int64))
    lrs, wds = xp.asarray(numpy.float32([0.4, 0.4])), xp.asarray(numpy.float32([1e-4, 0.0]))
    moms = xp.asarray(numpy.float32([0.9, 0.9]))
    ours = clock.ours(lambda: cuda_sgd.sgd_momentum_update(p, g, buf, ends, lrs, wds, moms))
    theirs = None
    if torch is not None:
        dev = "cuda" if args.gpu else "cpu"
        params = [torch.zeros(split, device=dev), torch.zeros(n - split, device=dev)]
        for t in params:
            t.requires_grad_(True)
            t.grad = torch.randn_like(t)
        opt = torch.optim.SGD([{"params": [params[0]], "weight_decay": 1e-4},
                               {"params": [params[1]], "weight_decay": 0.0}], lr=0.4, momentum=0.9)
        theirs = clock.torch(opt.step)
    add_row(rows, "sgd", "SGD momentum step, all parameters", (n,), ours, theirs,
            nbytes=5 * 4 * n)


def bench_small_ops(args, xp, clock, torch, F, rows):
    dev = "cuda" if args.gpu else "cpu"
    rng = numpy.random.default_rng(3)
    hw = max(4, 112 // args.sdiv)
    shape = (args.batch, 64 // args.div, hw, hw)
    x_h = rng.standard_normal(shape).astype(numpy.float32)
    x = xp.asarray(x_h)
    y, argmax = cuda_pool.max_pool2d_forward(x, 3, 2, 1)
    gy = xp.asarray(rng.standard_normal(y.shape).astype(numpy.float32))
    theirs_f = theirs_b = None
    if torch is not None:
        tx = torch.from_numpy(x_h).to(dev)
        ty, idx = F.max_pool2d(tx, 3, 2, 1, return_indices=True)
        tgy = torch.randn_like(ty)
        theirs_f = clock.torch(lambda: F.max_pool2d(tx, 3, 2, 1, return_indices=True))
        theirs_b = clock.torch(lambda: torch.ops.aten.max_pool2d_with_indices_backward(
            tgy, tx, [3, 3], [2, 2], [1, 1], [1, 1], False, idx))
    add_row(rows, "pool", "max pool 3x3/2 forward", shape,
            clock.ours(lambda: cuda_pool.max_pool2d_forward(x, 3, 2, 1)), theirs_f,
            nbytes=x_h.nbytes + y.size * 5)
    add_row(rows, "pool", "max pool 3x3/2 backward", shape,
            clock.ours(lambda: cuda_pool.max_pool2d_backward(gy, argmax, shape, 3, 2, 1)),
            theirs_b,
            nbytes=x_h.nbytes + y.size * 5)

    hw = max(4, 56 // args.sdiv)
    shape = (args.batch, 256 // args.div, hw, hw)
    a_h, b_h = (rng.standard_normal(shape).astype(numpy.float32) for _ in range(2))
    a, b = xp.asarray(a_h), xp.asarray(b_h)
    y = cuda_elementwise.add_relu_forward(a, b)
    theirs_f = theirs_b = None
    if torch is not None:
        ta, tb = torch.from_numpy(a_h).to(dev), torch.from_numpy(b_h).to(dev)
        ty = torch.relu(ta + tb)
        theirs_f = clock.torch(lambda: torch.relu(ta + tb))
        theirs_b = clock.torch(lambda: torch.ops.aten.threshold_backward(ta, ty, 0))
    add_row(rows, "elementwise", "residual add + ReLU forward", shape,
            clock.ours(lambda: cuda_elementwise.add_relu_forward(a, b)), theirs_f,
            nbytes=3 * a_h.nbytes)
    add_row(rows, "elementwise", "ReLU backward", shape,
            clock.ours(lambda: cuda_elementwise.relu_backward(a, y)), theirs_b,
            nbytes=3 * a_h.nbytes)

    n, k = args.batch, 1000
    z_h = rng.standard_normal((n, k)).astype(numpy.float32)
    labels_h = rng.integers(0, k, n)
    z, labels = xp.asarray(z_h), xp.asarray(labels_h)
    gloss = xp.full(n, 1.0 / n, xp.float32)

    def ours_xent():
        _, lse = cuda_loss.softmax_cross_entropy_forward(z, labels, 0.1)
        cuda_loss.softmax_cross_entropy_backward(z, labels, lse, gloss, 0.1)

    theirs = None
    if torch is not None:
        tz = torch.from_numpy(z_h).to(dev).requires_grad_(True)
        tl = torch.from_numpy(labels_h).to(dev)
        theirs = clock.torch(lambda: torch.autograd.grad(
            F.cross_entropy(tz, tl, label_smoothing=0.1), (tz,)))
    add_row(rows, "loss", "softmax cross-entropy forward+backward", (n, k), clock.ours(ours_xent),
            theirs, nbytes=2 * z_h.nbytes)


def add_row(rows, group, name, shape, ours_ms, torch_ms, flops=None, nbytes=None):
    row = {"group": group, "op": name, "shape": list(shape), "ours_ms": ours_ms,
           "torch_ms": torch_ms, "ratio": (ours_ms / torch_ms) if torch_ms else None}
    if flops:
        row["ours_tflops"] = flops / (ours_ms * 1e-3) / 1e12
    if nbytes:
        row["ours_gbs"] = nbytes / (ours_ms * 1e-3) / 1e9
    rows.append(row)
    rate = (f"{row['ours_tflops']:7.2f} TFLOP/s" if flops else f"{row['ours_gbs']:7.1f} GB/s   ")
    theirs = f"{torch_ms:9.3f} ms  ratio {row['ratio']:5.2f}" if torch_ms else "      n/a"
    print(f"{name:44s} {str(tuple(shape)):22s} {ours_ms:9.3f} ms {rate}  torch {theirs}",
          flush=True)


GROUPS = {"conv": bench_conv, "bn": bench_bn, "sgd": bench_sgd, "small": bench_small_ops}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--only", nargs="+", choices=sorted(GROUPS), help="run only these groups")
    p.add_argument("--emulate", action="store_true",
                   help="no GPU: tiny shapes through the CPU emulator (checks the script)")
    p.add_argument("--no_torch", action="store_true", help="skip the PyTorch side")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    args.gpu = not args.emulate
    if args.gpu and not backend.gpu_available():
        sys.exit("bench_kernels: no usable CUDA GPU (CuPy); use --emulate to check the script "
                 "on the CPU")
    args.div, args.sdiv = (8, 8) if args.emulate else (1, 1)
    if args.emulate:
        args.batch = min(args.batch, 2)
    xp = backend.cupy if args.gpu else numpy
    torch, F = (None, None) if args.no_torch else load_torch(args.gpu)
    clock = Clock(args.gpu)
    print(f"{'GPU' if args.gpu else 'CPU emulator'}, batch {args.batch}, float32; "
          f"PyTorch {'present' if torch else 'absent'}")
    rows = []
    for name in args.only or GROUPS:
        GROUPS[name](args, xp, clock, torch, F, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
