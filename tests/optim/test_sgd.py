"""SGD with momentum and weight decay (minitorch_gx/optim/sgd.py).

1. The optimizer on every implementation against the closed-form update,
   with parameter groups; gradients the user replaced; float32; its state.
2. The fast update == the reference update (``sgd_update_reference``).
3. The fused CUDA kernel (emulated at two block sizes, and CuPy) == the
   reference, over several steps; its grid-stride loop; the step wired to it.
4. The non-finite guard: ``nonfinite()`` and ``step(skip=...)``, the skip
   read by the kernel itself.
"""
import numpy
import pytest

import minitorch_gx as mt
from minitorch_gx.cuda import device as cuda_device, emulator, sgd as cuda_sgd
from minitorch_gx.nn import Parameter
from minitorch_gx.optim import SGD
from minitorch_gx.optim.sgd import _sgd_update_fast, sgd_update_reference
from tests.backends import (count_calls, IMPLEMENTATIONS, KERNEL_IMPLEMENTATIONS, assert_close, host,
                            launch_shapes, needs_emulator, needs_gpu, run_on)

KERNEL_PATHS = ("emulated", "cupy")


def make_params(rng, dtype=numpy.float64, dev=numpy.array):
    return [Parameter(dev(rng.standard_normal(s).astype(dtype))) for s in [(3, 2), (5,), (2, 2, 3)]]


def closed_form(p, g, buf, lr, m, wd):
    d = g + wd * p
    buf = m * buf + d
    return p - lr * buf, buf


# ==========================================================================
# 1. The optimizer against the closed form
# ==========================================================================
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_sgd_steps_match_closed_form_with_groups(impl, monkeypatch):
    kernel_calls = count_calls(monkeypatch, cuda_sgd, "sgd_momentum_update")
    rng = numpy.random.default_rng(0)
    with run_on(impl) as dev:
        ps = make_params(rng, dev=dev)
        expect = [host(p.data).copy() for p in ps]
        bufs = [numpy.zeros_like(e) for e in expect]
        # first two params decay, the third (a "bias") does not
        opt = SGD([{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}],
                  lr=0.1, momentum=0.9, weight_decay=1e-2)
        for step in range(3):
            grads = [rng.standard_normal(p.shape) for p in ps]
            opt.zero_grad()
            for p, g in zip(ps, grads):
                p.grad[...] = dev(g)
            opt.step()
            for i, g in enumerate(grads):
                wd = 1e-2 if i < 2 else 0.0
                expect[i], bufs[i] = closed_form(expect[i], g, bufs[i], 0.1, 0.9, wd)
            for p, e in zip(ps, expect):
                numpy.testing.assert_allclose(host(p.data), e, rtol=1e-12, atol=1e-12)
    # one fused launch per step on the kernel paths, none elsewhere
    assert len(kernel_calls) == (3 if impl in KERNEL_PATHS else 0)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_sgd_without_momentum_and_grad_replaced_by_user(impl):
    rng = numpy.random.default_rng(1)
    with run_on(impl) as dev:
        ps = make_params(rng, dev=dev)
        before = [host(p.data).copy() for p in ps]
        opt = SGD(ps, lr=0.5)
        g = [rng.standard_normal(p.shape) for p in ps]
        ps[0].grad = dev(g[0])       # a fresh array, not the optimizer's view
        ps[1].grad = None            # treated as zero
        ps[2].grad[...] = dev(g[2])
        opt.step()
    numpy.testing.assert_allclose(host(ps[0].data), before[0] - 0.5 * g[0])
    numpy.testing.assert_allclose(host(ps[1].data), before[1])
    numpy.testing.assert_allclose(host(ps[2].data), before[2] - 0.5 * g[2])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_sgd_trains_through_autograd_and_float32_stays_float32(impl):
    rng = numpy.random.default_rng(2)
    with run_on(impl) as dev:
        W = Parameter(dev(rng.standard_normal((4, 3)).astype(numpy.float32)))
        opt = SGD([W], lr=0.1, momentum=0.9, weight_decay=1e-4)
        x = mt.Tensor(dev(rng.standard_normal((5, 3)).astype(numpy.float32)))
        expect_grad = None
        for _ in range(2):
            opt.zero_grad()
            y = mt.functional.linear(x, W)
            (y * y).sum().backward()
            xh, Wh = host(x.data), host(W.data)
            expect_grad = 2 * (xh @ Wh.T).T @ xh
            numpy.testing.assert_allclose(host(W.grad), expect_grad, rtol=1e-5)
            opt.step()
    assert W.data.dtype == numpy.float32 and opt.flat_params.dtype == numpy.float32


def test_sgd_state_dict_round_trip():
    rng = numpy.random.default_rng(3)
    ps = make_params(rng)
    opt = SGD(ps, lr=0.1, momentum=0.9)
    for p in ps:
        p.grad[...] = 1.0
    opt.step()
    state = opt.state_dict()
    ps2 = [Parameter(p.data.copy()) for p in ps]
    opt2 = SGD(ps2, lr=0.3, momentum=0.9)
    opt2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == 0.1
    for i in range(len(ps)):
        numpy.testing.assert_array_equal(opt2.state_dict()["state"][i]["momentum_buffer"],
                                         state["state"][i]["momentum_buffer"])


def test_sgd_rejects_replaced_parameter_data():
    p = Parameter(numpy.ones(3))
    opt = SGD([p], lr=0.1)
    p.data = numpy.zeros(3)
    with pytest.raises(RuntimeError, match="create SGD last"):
        opt.step()


# ==========================================================================
# 2. The fast update == the reference update
# ==========================================================================
# (lr, momentum, weight_decay): each branch of the update
HYPER = [(0.1, 0.9, 1e-4), (0.1, 0.9, 0.0), (0.05, 0.0, 1e-3), (0.2, 0.0, 0.0)]


@pytest.mark.parametrize("dtype,tol", [(numpy.float64, 1e-12), (numpy.float32, 1e-6)],
                         ids=["float64", "float32"])
@pytest.mark.parametrize("lr,momentum,wd", HYPER)
def test_sgd_update_fast_equals_reference(lr, momentum, wd, dtype, tol):
    rng = numpy.random.default_rng(4)
    p = rng.standard_normal(257).astype(dtype)
    buf = numpy.zeros_like(p)
    p_ref, buf_ref = p.copy(), buf.copy()
    scratch = numpy.empty_like(p)
    for step in range(3):
        g = rng.standard_normal(p.size).astype(dtype)
        _sgd_update_fast(p, g, buf, lr, momentum, wd, scratch)
        sgd_update_reference(p_ref, g, buf_ref, lr, momentum, wd)
        assert p.dtype == buf.dtype == dtype
        assert_close(p, p_ref, tol, tol, f"parameters after step {step}")
        assert_close(buf, buf_ref, tol, tol, f"momentum after step {step}")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_sgd_every_implementation_steps_groups_alike(impl):
    """Groups with their own lr, momentum and weight decay: every path == the reference."""
    def train(path):
        rng = numpy.random.default_rng(5)
        with run_on(path) as dev:
            ps = [Parameter(dev(rng.standard_normal(s))) for s in [(7,), (3, 4), (5,), (2, 3)]]
            opt = SGD([{"params": [ps[i]], "lr": lr, "momentum": m, "weight_decay": wd}
                       for i, (lr, m, wd) in enumerate(HYPER)], lr=1.0)
            for _ in range(3):
                for p in ps:
                    p.grad[...] = dev(rng.standard_normal(p.shape))
                opt.step()
            return [host(p.data) for p in ps], host(opt.flat_momentum)
    (params, momentum), (params_ref, momentum_ref) = train(impl), train("reference")
    for i, (p, r) in enumerate(zip(params, params_ref)):
        assert_close(p, r, 1e-12, 1e-12, f"parameters of group {i}")
    assert_close(momentum, momentum_ref, 1e-12, 1e-12, "momentum")


# ==========================================================================
# 3. The fused kernel (emulated and CuPy) == the reference
# ==========================================================================
def _sgd_setup(n_per_group, seed=0, random_buf=False):
    rng = numpy.random.default_rng(seed)
    n = sum(n_per_group)
    p = rng.standard_normal(n).astype(numpy.float32)
    buf = rng.standard_normal(n).astype(numpy.float32) if random_buf else \
        numpy.zeros(n, numpy.float32)
    ends = numpy.cumsum(n_per_group).astype(numpy.int64)
    hyper = [(0.1, 1e-4, 0.9), (0.1, 0.0, 0.9), (0.05, 1e-3, 0.0)][:len(n_per_group)]
    return rng, p, buf, ends, hyper


# (impl, sizes per group, steps, random momentum, SGD_THREADS, atol): small and
# one-element groups on the emulator at two block sizes; a million elements on the GPU
_MARKS = {"emulated": needs_emulator, "cupy": needs_gpu}
SGD_KERNEL_CASES = [
    pytest.param(impl, sizes, 3, False, threads, 1e-7, marks=_MARKS[impl],
                 id=f"{impl}-{'+'.join(map(str, sizes))}-{threads}")
    for impl in _MARKS for threads in (256, 64) for sizes in [(300, 301, 399), (1,), (5000, 7)]
] + [pytest.param("cupy", (600_000, 1_000, 400_001), 1, True, 256, 1e-6, marks=needs_gpu,
                  id="cupy-million")]


@pytest.mark.parametrize("impl,sizes,steps,random_buf,threads,atol", SGD_KERNEL_CASES)
def test_sgd_kernel_matches_reference_over_steps(impl, sizes, steps, random_buf, threads, atol):
    rng, p, buf, ends, hyper = _sgd_setup(sizes, random_buf=random_buf)
    p_ref, buf_ref = p.copy(), buf.copy()
    starts = numpy.concatenate([[0], ends[:-1]])
    lrs, wds, moms = (numpy.array([h[i] for h in hyper], numpy.float32) for i in range(3))
    with run_on(impl) as dev, launch_shapes(SGD_THREADS=threads):
        p_dev, buf_dev = dev(p), dev(buf)
        tables = [dev(a) for a in (ends, lrs, wds, moms)]  # device tables, as the old GPU test
        for step in range(steps):
            g = rng.standard_normal(p.size).astype(numpy.float32)
            cuda_sgd.sgd_momentum_update(p_dev, dev(g), buf_dev, *tables)
            for (lr, wd, mom), a, b in zip(hyper, starts, ends):
                sgd_update_reference(p_ref[a:b], g[a:b], buf_ref[a:b], lr, mom, wd)
            assert_close(p_dev, p_ref, 1e-6, atol, f"parameters after step {step}")
            assert_close(buf_dev, buf_ref, 1e-6, atol, f"momentum after step {step}")


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
def test_sgd_kernel_rejects_inconsistent_buffers(impl):
    with run_on(impl) as dev:
        p, g = dev(numpy.zeros(10, numpy.float32)), dev(numpy.zeros(9, numpy.float32))
        lrs = numpy.ones(1, numpy.float32)
        with pytest.raises(ValueError, match="same size"):
            cuda_sgd.sgd_momentum_update(p, g, dev(numpy.zeros(10, numpy.float32)),
                                         numpy.array([10]), lrs, lrs, lrs)
        with pytest.raises(ValueError, match="last group ends at 8"):
            cuda_sgd.sgd_momentum_update(p, dev(numpy.zeros(10, numpy.float32)),
                                         dev(numpy.zeros(10, numpy.float32)),
                                         numpy.array([8]), lrs, lrs, lrs)


@needs_emulator
def test_sgd_grid_stride_loop_covers_every_element():
    # a grid far smaller than the buffer: each thread loops over many elements
    rng, p, buf, ends, hyper = _sgd_setup((700, 300))
    g = rng.standard_normal(p.size).astype(numpy.float32)
    lrs, wds, moms = (numpy.array([h[i] for h in hyper], numpy.float32) for i in range(3))
    dev = emulator.device()
    args = [dev.input(a, a.dtype) for a in (p, g, buf, ends, lrs, wds, moms)]
    emulator.build("sgd.cu", dict(cuda_device.builds())["sgd.cu"]).launch(
        "sgd_momentum_update", 3, 64,
        args + [dev.zeros(1, numpy.float32), numpy.int32(2), numpy.int64(p.size)])
    for (lr, wd, mom), a, b in zip(hyper, (0, 700), (700, 1000)):
        sgd_update_reference(p[a:b], g[a:b], buf[a:b], lr, mom, wd)
    assert_close(args[0], p, 1e-6, 1e-7, "parameters")
    assert_close(args[2], buf, 1e-6, 1e-7, "momentum")


# ==========================================================================
# 4. The non-finite guard
# ==========================================================================
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_nonfinite_sees_a_nan_gradient_or_an_infinite_loss(impl):
    with run_on(impl) as dev:
        ps = make_params(numpy.random.default_rng(0), dev=dev)
        opt = SGD(ps, lr=0.1, momentum=0.9)
        for p in ps:
            p.grad[...] = 1.0
        assert not bool(host(opt.nonfinite()))
        assert not bool(host(opt.nonfinite(dev(numpy.array(2.5)))))
        assert bool(host(opt.nonfinite(dev(numpy.array(numpy.inf)))))
        ps[2].grad[1, 0, 2] = numpy.nan
        assert bool(host(opt.nonfinite(dev(numpy.array(2.5)))))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_skipped_step_changes_nothing_and_a_clear_flag_changes_nothing_else(impl):
    def train(skips):
        rng = numpy.random.default_rng(3)
        with run_on(impl) as dev:
            ps = make_params(rng, dev=dev)
            opt = SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3)
            history = []
            for skip in skips:
                for p in ps:
                    p.grad[...] = dev(rng.standard_normal(p.shape))
                before = [host(p.data).copy() for p in ps], host(opt.flat_momentum).copy()
                opt.step(skip=None if skip is None else dev(numpy.array(skip)))
                history.append((before, ([host(p.data).copy() for p in ps],
                                         host(opt.flat_momentum).copy())))
            return history
    plain, flagged = train([None, None, None]), train([False, True, 0.0])
    for a, b in zip(plain[0][1][0], flagged[0][1][0]):
        assert numpy.array_equal(a, b)  # a clear flag: the same update as no flag
    for a, b in zip(flagged[2][0][0], flagged[2][1][0]):
        assert not numpy.array_equal(a, b)  # a clear flag (0.0) after a skip: updated again
    (params_before, momentum_before), (params_after, momentum_after) = flagged[1]
    for a, b in zip(params_before, params_after):
        assert numpy.array_equal(a, b)  # the skipped step changed nothing
    assert numpy.array_equal(momentum_before, momentum_after)


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
def test_the_kernel_reads_the_skip_flag_on_the_device(impl):
    rng, p, buf, ends, hyper = _sgd_setup((300, 301), random_buf=True)
    lrs, wds, moms = (numpy.array([h[i] for h in hyper], numpy.float32) for i in range(3))
    g = rng.standard_normal(p.size).astype(numpy.float32)
    with run_on(impl) as dev:
        for flag, changes in [(numpy.float32(1), False), (numpy.bool_(True), False),
                              (numpy.float32(0), True)]:
            p_dev, buf_dev = dev(p), dev(buf)
            cuda_sgd.sgd_momentum_update(p_dev, dev(g), buf_dev, ends, lrs, wds, moms,
                                         skip=dev(numpy.array([flag])))
            assert numpy.array_equal(host(p_dev), p) != changes, flag
            assert numpy.array_equal(host(buf_dev), buf) != changes, flag
        with pytest.raises(ValueError, match="one element"):
            cuda_sgd.sgd_momentum_update(dev(p), dev(g), dev(buf), ends, lrs, wds, moms,
                                         skip=dev(numpy.zeros(2, numpy.float32)))


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("threads", [256, 64])
@pytest.mark.parametrize("n", [1, 777, 70_000])
def test_the_nonfinite_kernel_counts_what_the_numpy_check_sees(impl, threads, n):
    rng = numpy.random.default_rng(n)
    g = rng.standard_normal(n).astype(numpy.float32)
    cases = [(g, 1.5, 0)]
    for where in {0, n // 2, n - 1}:
        bad = g.copy()
        bad[where] = numpy.nan if where % 2 else numpy.inf
        cases.append((bad, 1.5, 1))
    cases.append((g, numpy.inf, 1))
    cases.append((numpy.full(n, numpy.nan, numpy.float32), numpy.nan, n + 1))
    with run_on(impl) as dev, launch_shapes(SGD_THREADS=threads):
        for grads, loss, count in cases:
            got = cuda_sgd.count_nonfinite(dev(grads), dev(numpy.array(loss, numpy.float32)))
            assert got.shape == () and float(host(got)) == count, (loss, count)


def test_the_group_tables_go_to_the_device_once_and_the_learning_rates_each_step():
    from minitorch_gx.cuda import trace
    with trace.fake_gpu(record=False):
        ps = [Parameter(trace.to_gpu(numpy.ones(s, numpy.float32))) for s in (5, 7)]
        opt = SGD([{"params": [ps[0]], "weight_decay": 1e-4}, {"params": [ps[1]]}], lr=0.1,
                  momentum=0.9)
        opt.step()  # the first step copies the tables
    with trace.fake_gpu() as launches:
        opt.param_groups[0]["lr"] = 0.05  # as the scheduler does every step
        opt.step()
    assert [(x.kind, x.name) for x in launches] == [("h2d", "host -> device copy"),
                                                    ("memset", "memset (zeros)"),
                                                    ("kernel", "sgd_momentum_update")]
    with trace.fake_gpu() as launches:
        opt.param_groups[1]["momentum"] = 0.5  # a table changed: copied again
        opt.step()
    assert sum(x.kind == "h2d" for x in launches) == 4
