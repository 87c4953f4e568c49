"""Which passes are worth splitting over the threads: ``cpu.min_block_elements()`` in CPU steps.

    python benchmarks/bench_min_block.py                         # batch 32, 64x64: 2M against 512K
    python benchmarks/bench_min_block.py --values 1048576,524288,262144 --rounds 12
    python benchmarks/bench_min_block.py --batch 16 --image_size 224 --rounds 4
    MINITORCH_GX_KEEP_AWAKE=0 python benchmarks/bench_min_block.py   # cores free to halt
    python benchmarks/bench_min_block.py --vary bn_piece_bytes   # batch norm's pieces, 4 MiB or 1 MiB

Batch norm's and the element-wise passes split into blocks over the threads
only when each block gets at least ``min_block_elements()`` elements:
MIN_BLOCK_ELEMENTS_AWAKE while ``cpu.cores_awake`` keeps the cores from
halting, else MIN_BLOCK_ELEMENTS; this varies the one in force. Whole
training steps of resnext50_32x4d (train.py's step, as in bench_train.py,
inside ``cpu.cores_awake`` as train.py's are) alternate between the values
in ABBA order in one process (``bench_train.alternate_steps``); per-op timers
add up, within each timed step, batch norm forward and backward and the
element-wise passes (add + ReLU, the ReLU's gradient, gradients added where
a tensor feeds two ops). Printed per value: the medians of the step, of each
of those and of their sum. Per-op sums are steadier than whole steps on a
shared machine. The value changes no bit of a result (tests/test_cpu.py).
``--vary bn_piece_bytes`` alternates ``minitorch_gx.ops.norm.PIECE_BYTES``
instead, the size of the pieces of channels batch norm's passes go over
while they are in cache (it changes no bit either: tests/ops/test_norm.py).
"""
import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import minitorch_gx  # noqa: E402, F401  (before NumPy, as train.py: see minitorch_gx/cpu.py)
from bench_train import alternate_steps, cpu_step_for, setting  # noqa: E402  (this folder)
from minitorch_gx import cpu  # noqa: E402
from minitorch_gx.ops import basic, norm  # noqa: E402

TIMED = {"bn forward": (norm, "batch_norm_train_forward"),
         "bn backward": (norm, "batch_norm_backward"),
         "add+relu": (basic, "_add_relu_forward_fast"),
         "relu backward": (basic, "_relu_backward_fast"),
         "gradient adds": (basic, "_add_arrays_fast")}

# --vary: (awake -> (module, setting name), default --values)
VARIED = {
    "min_block": (lambda awake: (cpu, "MIN_BLOCK_ELEMENTS_AWAKE" if awake
                                 else "MIN_BLOCK_ELEMENTS"), f"{1 << 21},{1 << 19}"),
    "bn_piece_bytes": (lambda awake: (norm, "PIECE_BYTES"), f"{4 << 20},{1 << 20}"),
}


def time_passes(spent):
    """Wrap each function of TIMED so that it adds its time to spent[its name]."""
    for name, (module, attr) in TIMED.items():
        fn = getattr(module, attr)

        def timed(*a, _fn=fn, _name=name, **k):
            t0 = time.perf_counter()
            result = _fn(*a, **k)
            spent[_name] += time.perf_counter() - t0
            return result

        setattr(module, attr, timed)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--vary", choices=sorted(VARIED), default="min_block",
                   help="the setting to alternate: min_block_elements() or batch norm's "
                        "PIECE_BYTES")
    p.add_argument("--values", default=None,
                   help="comma-separated values of that setting to alternate (default: "
                        + "; ".join(f"{k} {v[1]}" for k, v in sorted(VARIED.items())) + ")")
    args = p.parse_args()
    if args.values is None:
        args.values = VARIED[args.vary][1]
    try:
        values = [int(v) for v in args.values.split(",")]
    except ValueError:
        sys.exit(f"error: --values {args.values!r} is not a comma-separated list of whole numbers")
    if min(values) < 1 or len(set(values)) < 2:
        sys.exit("error: --values needs two or more different values of at least 1")
    step, threads = cpu_step_for(args, "splitting")
    spent = dict.fromkeys(TIMED, 0.0)
    time_passes(spent)
    with cpu.cores_awake() as awake:
        owner, name = VARIED[args.vary][0](awake.started)
        print(f"threads: {threads}; batch {args.batch}, {args.image_size}x{args.image_size}; "
              f"keepers {'on' if awake.started else 'off'}: varying {name} "
              f"(now {getattr(owner, name)})")
        arms = {v: functools.partial(setting, owner, name, v) for v in values}
        step()
        times = alternate_steps(step, arms, args.rounds, spent)
    for v in values:
        t = times[v]
        passes = [sum(parts) for parts in zip(*(t[k] for k in TIMED))]
        print(f"{v:>9d}: step {statistics.median(t['step']) * 1000:6.0f} ms, those passes "
              f"{statistics.median(passes) * 1000:6.1f} ms (" + ", ".join(
                  f"{k} {statistics.median(t[k]) * 1000:.1f}" for k in TIMED) + ")")


if __name__ == "__main__":
    main()
