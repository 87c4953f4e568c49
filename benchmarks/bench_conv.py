"""Time the fast conv2d path on every distinct convolution of ResNeXt50_32x4d.

    python benchmarks/bench_conv.py                    # batch 16, 224x224, with torch if present
    python benchmarks/bench_conv.py --batch 4 --only grouped --no-torch
    python benchmarks/bench_conv.py --batch 32 --size 64 --fold never   # MEC for every grouped conv
    python benchmarks/bench_conv.py --batch 32 --size 64 --whole-map never  # 2x2 maps folded too
    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_conv.py --cpu-time   # on a busy machine

For each shape: forward, backward-data and backward-weight in ms (best of
--repeat rounds), the shape's share of the step's conv time (times how often the
network uses it) and GFLOP/s; then the total conv time of one training step.
The stem's backward-data is not timed: the image needs no gradient. With torch
importable, torch's conv2d forward + backward on the same shapes is timed in
the same rounds, right after ours (with a pause so the two thread pools do not
fight), and the ratio printed. On a machine shared with other jobs wall time
says little; --cpu-time measures this process's CPU time on one thread (both
libraries), which other jobs barely disturb. Inputs are in CNHW memory, as
train.py's activations are (``--layout nchw`` for the other); ``--fold``
overrides which convolutions run as one im2col GEMM per group over the batch
and ``--whole-map never`` turns off the dense map of whole images on maps no
larger than the kernel (``minitorch_gx/ops/conv.py``: auto is its rule).
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from minitorch_gx import cpu  # noqa: E402  (before NumPy: minitorch_gx/cpu.py)
from minitorch_gx.ops import conv as ops_conv  # noqa: E402
import numpy  # noqa: E402


def resnext50_convs(size=224):
    """(name, count, C, K, kernel, stride, padding, groups, input H=W) of every
    distinct conv of ResNeXt50_32x4d, count = how many layers share it."""
    shapes = [("stem 7x7/2", 1, 3, 64, 7, 2, 3, 1, size)]
    hw, inp = size // 4, 64
    for stage, (width, out, blocks) in enumerate([(128, 256, 3), (256, 512, 4),
                                                  (512, 1024, 6), (1024, 2048, 3)], 1):
        stride = 1 if stage == 1 else 2
        o = hw // stride
        shapes += [
            (f"l{stage} conv1 first", 1, inp, width, 1, 1, 0, 1, hw),
            (f"l{stage} conv2 first g32", 1, width, width, 3, stride, 1, 32, hw),
            (f"l{stage} downsample", 1, inp, out, 1, stride, 0, 1, hw),
            (f"l{stage} conv1", blocks - 1, out, width, 1, 1, 0, 1, o),
            (f"l{stage} conv3", blocks, width, out, 1, 1, 0, 1, o),
        ]
        if stride == 1:  # the first block's 3x3 has the same shape as the others
            shapes[-4] = (shapes[-4][0].replace(" first", ""), blocks) + shapes[-4][2:]
        else:
            shapes.append((f"l{stage} conv2 g32", blocks - 1, width, width, 3, 1, 1, 32, o))
        hw, inp = o, out
    return shapes


clock = time.perf_counter


def ms(fn):
    t = clock()
    fn()
    return 1e3 * (clock() - t)


def cnhw(a):
    """(N, C, H, W) a in C-contiguous (C, N, H, W) memory."""
    return numpy.ascontiguousarray(a.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)


def time_ours(shape, N, dtype, layout):
    """One timing of (fwd, bwd_data, bwd_weight) in ms and the forward MACs."""
    name, count, C, K, k, stride, pad, groups, hw = shape
    rng = numpy.random.default_rng(0)
    x = layout(rng.standard_normal((N, C, hw, hw), dtype=numpy.float32).astype(dtype))
    W = rng.standard_normal((K, C // groups, k, k), dtype=numpy.float32).astype(dtype)
    y = ops_conv.conv2d_forward(x, W, stride, pad, groups)
    gy = layout(rng.standard_normal(y.shape, dtype=numpy.float32).astype(dtype))
    args = (stride, pad, groups)

    def data():
        return ops_conv.conv2d_backward_data(gy, W, x.shape, *args)

    def weight():
        return ops_conv.conv2d_backward_weight(gy, x, W.shape, *args)

    fwd = ms(lambda: ops_conv.conv2d_forward(x, W, *args))
    bwd_data = 0.0 if C == 3 else ms(data)
    bwd_weight = ms(weight)
    # the backward as Conv2d.backward runs it: gx and gW side by side where it does so
    side_by_side = C != 3 and ops_conv._side_by_side(gy, W)
    both = ms(lambda: cpu.side_by_side(data, weight)) if side_by_side else bwd_data + bwd_weight
    macs = N * K * (C // groups) * k * k * y.shape[2] * y.shape[3]
    return fwd, bwd_data, bwd_weight, both, macs


def time_torch(shape, N):
    """One timing of torch's conv2d forward + backward in ms."""
    import torch
    name, count, C, K, k, stride, pad, groups, hw = shape
    x = torch.randn(N, C, hw, hw, requires_grad=C != 3)
    W = torch.randn(K, C // groups, k, k, requires_grad=True)
    wrt = (x, W) if C != 3 else (W,)

    def step():
        y = torch.nn.functional.conv2d(x, W, None, stride, pad, 1, groups)
        torch.autograd.grad(y, wrt, torch.ones_like(y))

    return ms(step)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--float64", action="store_true")
    parser.add_argument("--only", choices=["stem", "pointwise", "grouped"])
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--layout", choices=["cnhw", "nchw"], default="cnhw")
    parser.add_argument("--fold", choices=["auto", "always", "never"], default="auto",
                        help="always: every conv with >= 8 outputs per group folded; never: none")
    parser.add_argument("--whole-map", choices=["auto", "never"], default="auto",
                        help="never: maps no larger than the kernel lowered like the others")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time CPU, not wall clock; run with OPENBLAS_NUM_THREADS=1")
    args = parser.parse_args()
    global clock
    if args.cpu_time:
        clock = time.process_time
        if os.environ.get("OPENBLAS_NUM_THREADS") != "1":
            print("warning: --cpu-time without OPENBLAS_NUM_THREADS=1 counts every BLAS thread")
    dtype = numpy.float64 if args.float64 else numpy.float32
    layout = cnhw if args.layout == "cnhw" else numpy.ascontiguousarray
    if args.fold == "always":
        ops_conv.FOLD_MAX_PIXELS = 1 << 62
    elif args.fold == "never":
        ops_conv.FOLD_MIN_OUT_CHANNELS = 1 << 62
    if args.whole_map == "never":
        ops_conv._whole_map = lambda g: False
    shapes = resnext50_convs(args.size)
    kinds = {"stem": lambda s: s[2] == 3, "grouped": lambda s: s[7] > 1,
             "pointwise": lambda s: s[4] == 1}
    if args.only:
        shapes = [s for s in shapes if kinds[args.only](s)]
    print(f"batch {args.batch}, {args.size}x{args.size}, {numpy.dtype(dtype).name}, "
          f"{args.layout.upper()} memory, fold {args.fold}, whole map {args.whole_map}, "
          f"{os.cpu_count()} CPUs, OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}, "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}")

    torch = None
    if not args.no_torch:
        try:
            import torch
            if args.cpu_time:
                torch.set_num_threads(1)
        except ImportError:
            print("torch not importable: no comparison")
    # Rounds over all shapes, keeping each shape's best: on a shared machine a
    # burst of load then spoils one round of a shape, not all of them. Round 0
    # also warms up (scratch buffers, page faults, BLAS threads).
    best, torch_best = {}, {}
    with cpu.cores_awake():  # as train.py's steps run
        for _ in range(args.repeat + 1):
            for s in shapes:
                times = time_ours(s, args.batch, dtype, layout)
                best[s] = times if s not in best else tuple(map(min, best[s], times))
                if torch is not None:
                    time.sleep(0.1)  # one library's idle threads stop spinning before the other's
                    torch_best[s] = min(torch_best.get(s, float("inf")), time_torch(s, args.batch))
                    time.sleep(0.1)
    rows = [(s,) + best[s] for s in shapes]
    total = sum(s[1] * (f + b) for s, f, d, w, b, _ in rows)
    in_turn = sum(s[1] * (f + d + w) for s, f, d, w, b, _ in rows)
    total_macs = sum(s[1] * m for s, *_, m in rows)
    print(f"{'shape':24s} {'n':>2s} {'C':>5s} {'K':>5s} k s {'HW':>4s} | {'fwd':>7s} {'bwd_x':>7s} "
          f"{'bwd_W':>7s} {'bwd':>7s} ms | share | GFLOP/s")
    for s, f, d, w, b, macs in rows:
        name, count, C, K, k, stride, pad, groups, hw = s
        flops = 2 * macs * (2 if C == 3 else 3)
        print(f"{name:24s} {count:2d} {C:5d} {K:5d} {k} {stride} {hw:4d} | "
              f"{f:7.1f} {d:7.1f} {w:7.1f} {b:7.1f}    | {100 * count * (f + b) / total:4.1f}% | "
              f"{flops / (f + b) / 1e6:6.1f}")
    print("bwd: bwd_x and bwd_W as Conv2d.backward runs them (side by side for kernels "
          "larger than 1x1: ops/conv.py)")
    print(f"forward MACs per image: {total_macs / args.batch / 1e9:.2f} G")
    what = "conv CPU time" if args.cpu_time else "conv time"
    print(f"ours: {what} per training step {total / 1e3:.2f} s "
          f"({args.batch / (total / 1e3):.1f} img/s if convs were all); "
          f"{in_turn / 1e3:.2f} s with every bwd_x and bwd_W in turn")

    if torch is None:
        return
    torch_ms = [s[1] * torch_best[s] for s in shapes]
    ours_ms = [s[1] * (f + b) for s, f, d, w, b, _ in rows]
    print(f"\n{'shape':24s} {'ours ms':>9s} {'torch ms':>9s} {'ours/torch':>10s}")
    for s, o, t in zip(shapes, ours_ms, torch_ms):
        print(f"{s[0]:24s} {o:9.1f} {t:9.1f} {o / t:10.2f}")
    t_total = sum(torch_ms)
    median = statistics.median(o / t for o, t in zip(ours_ms, torch_ms))
    print(f"torch ({torch.get_num_threads()} threads): {what} per training step "
          f"{t_total / 1e3:.2f} s; ours / torch = {total / t_total:.2f} "
          f"(median shape ratio {median:.2f})")


if __name__ == "__main__":
    main()
