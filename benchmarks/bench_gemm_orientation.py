"""Which way round to take the GEMMs of the folded and whole-map convolutions.

    python benchmarks/bench_gemm_orientation.py                       # batch 32, 64x64
    python benchmarks/bench_gemm_orientation.py --batch 16 --size 224 --rounds 6

A product A @ B^T whose operands are both read along their rows (OpenBLAS's
"NT" case) ran at about half the speed of A @ B (the "NN" case) here when A
has few rows, as a grouped convolution's oCg outputs per group are. Two
tables, the arms alternating in ABBA order in one process
(``bench_train.alternate_steps``), medians:

1. The GEMMs themselves, on one BLAS thread as in a block: for every folded
   convolution of ResNeXt50_32x4d at this batch and size, one block's
   weight-gradient product gy @ cols^T against cols @ gy^T (the copy of
   gy^T included), and the whole-map forward's x rows @ Wmap^T with Wmap^T
   as a transposed view against in memory of its own. GMAC/s.
2. The backward of each folded convolution as ``Conv2d.backward`` runs it
   (input and weight gradients side by side), with the weight gradient
   taken either way round (``TRANSPOSED_WEIGHT_GRADIENT_MAX_OUT_CHANNELS``
   in minitorch_gx/ops/conv.py), and the sums over a training step: each
   way round for all, and with the rule in force.
The orientation changes these results by rounding at most; a check is
printed per shape: "same" (the same bits), "close" (other bits, within
float32 rounding of the sums: ``agreement``) or "DIFF" (more: a defect).
OpenBLAS's AVX-512 kernels ("SkylakeX") gave the same bits in every shape
here; its AVX2 ones ("Haswell") did not.
"""
import argparse
import functools
import os
import statistics
import sys
import types

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import minitorch_gx  # noqa: E402, F401  (before NumPy, as train.py: see minitorch_gx/cpu.py)
from bench_conv import cnhw, resnext50_convs  # noqa: E402  (this folder)
from bench_train import alternate_steps, setting  # noqa: E402
from minitorch_gx import cpu  # noqa: E402
from minitorch_gx.ops import conv  # noqa: E402
import numpy  # noqa: E402

BOUND = "TRANSPOSED_WEIGHT_GRADIENT_MAX_OUT_CHANNELS"


def convolutions(batch, size):
    """(shape, x, W, gy, geometry) of each folded or whole-map conv of ResNeXt50."""
    rng = numpy.random.default_rng(0)
    for shape in resnext50_convs(size):
        _, _, C, K, k, stride, pad, groups, hw = shape
        x = cnhw(rng.standard_normal((batch, C, hw, hw), dtype=numpy.float32))
        W = rng.standard_normal((K, C // groups, k, k), dtype=numpy.float32)
        g = conv._Geometry(x.shape, W.shape, stride, pad, groups)
        if g.is_pointwise() or not (conv._whole_map(g) or conv._folds(x, g)):
            continue
        gy = cnhw(rng.standard_normal((batch, K, g.P, g.Q), dtype=numpy.float32))
        yield shape, x, W, gy, g


def one_blas_thread(fn):
    """fn() as a block runs it: its GEMMs on one BLAS thread (cpu.run_blocks)."""
    return cpu.run_blocks(lambda a, b: fn(), 1)[0]


def gemm_operands(W, g, rng):
    """The largest GEMM of the conv and its two orientations as callables:
    (name, macs, {orientation: fn})."""
    if conv._whole_map(g):
        rows = rng.standard_normal((g.G, g.N, g.iCg * g.H * g.W), dtype=numpy.float32)
        Wmap = conv._weight_map(W, g)
        Wmap_t = conv._weight_map(W, g, transposed=True)
        return ("y (whole map)", rows.size * Wmap.shape[1],
                {"NT": lambda: rows @ Wmap.transpose(0, 2, 1), "NN": lambda: rows @ Wmap_t})
    groups, images = conv._fold_blocks(g, 4)
    pixels = images * g.P * g.Q
    cols = rng.standard_normal((groups, g.iCg * g.R * g.S, pixels), dtype=numpy.float32)
    gy = rng.standard_normal((groups, g.oCg, pixels), dtype=numpy.float32)
    return ("gW (folded)", groups * g.oCg * cols.shape[1] * pixels,
            {"NT": lambda: gy @ cols.transpose(0, 2, 1),
             "NN": lambda: cols @ numpy.ascontiguousarray(gy.transpose(0, 2, 1))})


def gemm_rates(fns, macs, rounds):
    """GMAC/s of each orientation's GEMM, alternating in ABBA order
    (``alternate_steps``: the arm puts its GEMM in place), medians."""
    now = types.SimpleNamespace(gemm=None)
    arms = {name: functools.partial(setting, now, "gemm", fn) for name, fn in fns.items()}
    times = alternate_steps(lambda: one_blas_thread(now.gemm), arms, rounds)
    return {name: macs / statistics.median(t["step"]) / 1e9 for name, t in times.items()}


WAYS = {"cols @ gy^T": 1 << 30, "gy @ cols^T": 0}  # the bound that gives each


def agreement(a, b):
    """"same" when a and b have the same bits, "close" when they differ by
    float32 rounding only (within 1e-5 of the largest |value|, 1e-4 relative:
    sums of products taken in another order), else "DIFF"."""
    if numpy.array_equal(a, b):
        return "same"
    scale = float(numpy.abs(a).max())
    return "close" if numpy.allclose(a, b, rtol=1e-4, atol=1e-5 * scale) else "DIFF"


def backward_times(shape, x, W, gy, rounds):
    """({way: median ms}, ``agreement``) of gW as Conv2d.backward computes it:
    side by side with gx, or alone for the stem (the image needs no gradient)."""
    stride, padding, groups = shape[5:8]

    def weight():
        return conv.conv2d_backward_weight(gy, x, W.shape, stride, padding, groups)

    def data():
        return conv.conv2d_backward_data(gy, W, x.shape, stride, padding, groups)

    def backward():
        return weight() if x.shape[1] == 3 else cpu.side_by_side(data, weight)[1]

    arms = {way: functools.partial(setting, conv, BOUND, bound) for way, bound in WAYS.items()}
    results = []
    for arm in arms.values():
        with arm():
            results.append(backward())
    times = alternate_steps(backward, arms, rounds)
    return ({way: 1e3 * statistics.median(t["step"]) for way, t in times.items()},
            agreement(*results))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=20, help="ABBA rounds per shape (even)")
    args = p.parse_args()
    if args.batch < 1 or args.size < 32 or args.rounds < 2 or args.rounds % 2:
        sys.exit("error: this needs --batch >= 1, --size >= 32 and an even --rounds >= 2")
    print(f"batch {args.batch}, {args.size}x{args.size}, {args.rounds} ABBA rounds, "
          f"{cpu.threads()} threads; medians")
    rng = numpy.random.default_rng(1)
    found = list(convolutions(args.batch, args.size))
    totals = dict.fromkeys([*WAYS, "the rule"], 0.0)
    with cpu.cores_awake():  # as train.py's steps run
        print(f"\n{'GEMM of':38s} {'oCg':>4s} {'NT GMAC/s':>10s} {'NN GMAC/s':>10s}")
        for shape, _, W, _, g in found:
            what, macs, fns = gemm_operands(W, g, rng)
            rate = gemm_rates(fns, macs, args.rounds)
            print(f"{shape[0] + ', ' + what:38s} {g.oCg:4d} {rate['NT']:10.1f} {rate['NN']:10.1f}")

        print(f"\n{'backward of':24s} {'n':>2s} {'oCg':>4s} {'cols @ gy^T ms':>15s} "
              f"{'gy @ cols^T ms':>15s} {'bits':>5s}")
        for shape, x, W, gy, g in found:
            if conv._whole_map(g):
                continue
            med, bits = backward_times(shape, x, W, gy, args.rounds)
            ruled = "cols @ gy^T" if g.oCg <= getattr(conv, BOUND) else "gy @ cols^T"
            for way, ms in [*med.items(), ("the rule", med[ruled])]:
                totals[way] += shape[1] * ms
            print(f"{shape[0]:24s} {shape[1]:2d} {g.oCg:4d} {med['cols @ gy^T']:15.2f} "
                  f"{med['gy @ cols^T']:15.2f} {bits:>5s}")
    print(f"{'per training step':24s} {'':2s} {'':4s} {totals['cols @ gy^T']:15.1f} "
          f"{totals['gy @ cols^T']:15.1f}")
    print(f"with the rule in force (cols @ gy^T when oCg <= {getattr(conv, BOUND)}): "
          f"{totals['the rule']:.1f} ms per training step")


if __name__ == "__main__":
    main()
