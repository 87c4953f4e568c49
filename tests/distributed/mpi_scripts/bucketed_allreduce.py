"""Run under mpirun: the bucketed gradient allreduce against a plain mean.

    mpirun -n 3 python bucketed_allreduce.py [cpu|gpu] [transport] [timeout]

Every rank builds the same parameters (odd sizes, float32 and float64) and a
loss whose gradient on rank r is a known rank-dependent array, so each rank
can compute the expected mean of all ranks' gradients itself. Buckets are made
tiny so that there are several of them. Prints one line "ok <check>" per
check on rank 0 and "ALL OK" at the end; any failure raises, and the failure
handler ends the job with a non-zero exit. ``timeout``: the deadline of every
collective, in seconds (the default's otherwise).
"""
import sys
from pathlib import Path

import numpy

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root
import minitorch_gx as mt  # noqa: E402
from minitorch_gx import backend, distributed  # noqa: E402
from minitorch_gx.nn import Parameter  # noqa: E402

SHAPES = [(7,), (3, 5), (1,), (2, 3, 3), (11,), (4, 1, 3)]  # 7+15+1+18+11+12 = 64 elements


DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cpu"
TRANSPORT = sys.argv[2] if len(sys.argv) > 2 else None
TIMEOUT = float(sys.argv[3]) if len(sys.argv) > 3 else 600.0
xp = backend.cupy if DEVICE == "gpu" else numpy


def make_params():
    # float64 first, then float32: the reducer must not mix dtypes in a bucket
    rng = numpy.random.default_rng(0)
    return [Parameter(xp.asarray(rng.standard_normal(s).astype(numpy.float64 if i < 4
                                                                else numpy.float32)))
            for i, s in enumerate(SHAPES)]


def coefficients(rank, step):
    """The gradient of parameter i on ``rank`` at ``step`` (the loss is linear)."""
    rng = numpy.random.default_rng(1000 * step + rank)
    return [rng.standard_normal(s) for s in SHAPES]


def backward(params, coefs, skip=()):
    """loss = sum_i sum(c_i * p_i) over the parameters not in ``skip``, one
    loss per dtype (so that no gradient is promoted to float64), float32 first
    as backward would reach the last layers first."""
    for dtype in (numpy.float32, numpy.float64):
        loss = None
        for i, (p, c) in enumerate(zip(params, coefs)):
            if i in skip or p.dtype != dtype:
                continue
            term = (p * mt.Tensor(xp.asarray(c.astype(p.dtype)))).sum()
            loss = term if loss is None else loss + term
        loss.backward()


def expected_mean(world, step, skip_on=lambda r: ()):
    per_rank = []
    for r in range(world):
        coefs = coefficients(r, step)
        per_rank.append([numpy.zeros_like(c) if i in skip_on(r) else c for i, c in enumerate(coefs)])
    return [numpy.mean([g[i] for g in per_rank], axis=0) for i in range(len(SHAPES))]


def check_close(params, expect, what):
    for i, (p, e) in enumerate(zip(params, expect)):
        tol = 1e-12 if p.dtype == numpy.float64 else 1e-5
        err = numpy.max(numpy.abs(backend.to_numpy(p.grad) - e))
        if p.grad.dtype != p.dtype or err > tol:
            raise AssertionError(f"{what}: parameter {i} {p.shape} {p.dtype}: max error {err:.3g} "
                                 f"(grad dtype {p.grad.dtype})")


def main():
    ctx = distributed.init(DEVICE, TRANSPORT, timeout=TIMEOUT)
    distributed.install_failure_handler(ctx)
    rank, world = ctx.rank, ctx.world_size
    say = print if rank == 0 else (lambda *a, **k: None)
    assert world > 1, "run me under mpirun -n 2 or more"

    params = make_params()
    # ~100 bytes per bucket: every bucket closes after one or two parameters
    reducer = distributed.GradientAllreducer(params, bucket_mb=100 / 2 ** 20)
    sizes = reducer.bucket_sizes
    assert len(sizes) >= 4 and sum(sizes) == 64, sizes
    for b in reducer.buckets:
        assert len({p.dtype for p in b.params}) == 1
    # reverse registration order: the last parameter is in the first bucket
    assert reducer.buckets[0].params[0] is params[-1]
    say("ok buckets", sizes, ctx.transport)

    # several steps: state is reset between steps
    for step in range(3):
        for p in params:
            p.grad = None
        backward(params, coefficients(rank, step))
        # Overlap: buckets were launched during backward, before synchronize
        assert all(b.started for b in reducer.buckets), "buckets not launched from the hooks"
        reducer.synchronize()
        check_close(params, expected_mean(world, step), f"step {step}")
    say("ok mean over steps")

    # a parameter unused on odd ranks counts as zeros there; p.grad None beforehand
    for p in params:
        p.grad = None
    skip_on = (lambda r: (2,) if r % 2 else ())
    backward(params, coefficients(rank, 7), skip=skip_on(rank))
    reducer.synchronize()
    check_close(params, expected_mean(world, 7, skip_on), "unused parameter")
    say("ok unused parameter")

    # gradients held in place (as SGD's flat views): unpack writes into them
    held = [xp.zeros(p.shape, p.dtype) for p in params]
    for p, h in zip(params, held):
        p.grad = h
    backward(params, coefficients(rank, 8))
    reducer.synchronize()
    assert all(p.grad is h for p, h in zip(params, held)), "p.grad was replaced, not updated"
    check_close(params, expected_mean(world, 8), "in-place gradients")
    say("ok in place")

    # accumulation: first pass inside no_sync, second pass reduces the sum
    for p in params:
        p.grad = None
    with reducer.no_sync():
        backward(params, coefficients(rank, 9))
    assert not any(b.started for b in reducer.buckets)
    backward(params, coefficients(rank, 10))
    reducer.synchronize()
    expect = [a + b for a, b in zip(expected_mean(world, 9), expected_mean(world, 10))]
    check_close(params, expect, "no_sync accumulation")
    say("ok no_sync")

    # backward twice without synchronize is an error, not a silent half-reduced step
    for p in params:
        p.grad = None
    backward(params, coefficients(rank, 11))
    try:
        backward(params, coefficients(rank, 12))
    except RuntimeError as e:
        assert "twice" in str(e)
    else:
        raise AssertionError("second backward before synchronize() was accepted")
    reducer.synchronize()  # leaves the reducer usable
    say("ok double backward refused")

    # helpers: broadcast (parameters of every dtype, 0-d counters), sums, means
    arrays = [xp.full((3, 2), float(rank)), xp.array(5 + rank, dtype=numpy.int64),
              xp.arange(5, dtype=numpy.float32) * (rank + 1)]
    distributed.broadcast_parameters(arrays)
    assert bool((arrays[0] == 0).all()) and int(arrays[1]) == 5 and arrays[1].shape == ()
    assert numpy.array_equal(backend.to_numpy(arrays[2]), numpy.arange(5, dtype=numpy.float32))
    counts = distributed.allreduce_sum(xp.array([rank, 1], dtype=numpy.int64))
    assert backend.get_array_module(counts) is xp and counts.dtype == numpy.int64
    assert counts.tolist() == [world * (world - 1) // 2, world]
    flat = xp.arange(6, dtype=numpy.float32).reshape(2, 3) * (rank + 1)
    distributed.allreduce_inplace(flat)  # the gradient transport, blocking
    expect = numpy.arange(6, dtype=numpy.float32).reshape(2, 3) * (world * (world + 1) // 2)
    assert numpy.array_equal(backend.to_numpy(flat), expect)
    assert distributed.allreduce_sum(rank + 1) == world * (world + 1) // 2
    assert abs(distributed.allreduce_mean(float(rank)) - (world - 1) / 2) < 1e-12
    say("ok helpers")

    distributed.barrier()
    say("ALL OK", flush=True)


if __name__ == "__main__":
    main()
