"""SGD against its closed-form update, parameter groups, state; the schedule
against its formula."""
import math

import numpy
import pytest

import minitorch_gx as mt
from minitorch_gx import backend
from minitorch_gx.nn import Parameter
from minitorch_gx.optim import SGD, WarmupCosineLR, warmup_cosine_lr


def make_params(rng, dtype=numpy.float64):
    return [Parameter(rng.standard_normal(s).astype(dtype)) for s in [(3, 2), (5,), (2, 2, 3)]]


def closed_form(p, g, buf, lr, m, wd):
    d = g + wd * p
    buf = m * buf + d
    return p - lr * buf, buf


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_sgd_steps_match_closed_form_with_groups(impl):
    rng = numpy.random.default_rng(0)
    ps = make_params(rng)
    expect = [p.data.copy() for p in ps]
    bufs = [numpy.zeros_like(e) for e in expect]
    # first two params decay, the third (a "bias") does not
    opt = SGD([{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}],
              lr=0.1, momentum=0.9, weight_decay=1e-2)
    with backend.implementation(impl):
        for step in range(3):
            grads = [rng.standard_normal(p.shape) for p in ps]
            opt.zero_grad()
            for p, g in zip(ps, grads):
                p.grad[...] = g
            opt.step()
            for i, g in enumerate(grads):
                wd = 1e-2 if i < 2 else 0.0
                expect[i], bufs[i] = closed_form(expect[i], g, bufs[i], 0.1, 0.9, wd)
            for p, e in zip(ps, expect):
                numpy.testing.assert_allclose(p.data, e, rtol=1e-12, atol=1e-12)


def test_sgd_without_momentum_and_grad_replaced_by_user():
    rng = numpy.random.default_rng(1)
    ps = make_params(rng)
    before = [p.data.copy() for p in ps]
    opt = SGD(ps, lr=0.5)
    g = [rng.standard_normal(p.shape) for p in ps]
    ps[0].grad = g[0]            # a fresh array, not the optimizer's view
    ps[1].grad = None            # treated as zero
    ps[2].grad[...] = g[2]
    opt.step()
    numpy.testing.assert_allclose(ps[0].data, before[0] - 0.5 * g[0])
    numpy.testing.assert_allclose(ps[1].data, before[1])
    numpy.testing.assert_allclose(ps[2].data, before[2] - 0.5 * g[2])


def test_sgd_trains_through_autograd_and_float32_stays_float32():
    rng = numpy.random.default_rng(2)
    W = Parameter(rng.standard_normal((4, 3)).astype(numpy.float32))
    opt = SGD([W], lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = mt.Tensor(rng.standard_normal((5, 3)).astype(numpy.float32))
    expect_grad = None
    for _ in range(2):
        opt.zero_grad()
        y = mt.functional.linear(x, W)
        (y * y).sum().backward()
        expect_grad = 2 * (x.data @ W.data.T).T @ x.data
        numpy.testing.assert_allclose(W.grad, expect_grad, rtol=1e-5)
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


def test_warmup_cosine_formula_at_chosen_steps():
    spe, base, total = 10, 0.4, 150
    # warm-up: linear per step, reaching base at the last warm-up step
    assert warmup_cosine_lr(0, spe, base, 1, total) == pytest.approx(0.04)
    assert warmup_cosine_lr(4, spe, base, 1, total) == pytest.approx(0.2)
    assert warmup_cosine_lr(9, spe, base, 1, total) == pytest.approx(0.4)
    # then the cosine over epochs, constant within an epoch
    for step in (10, 15, 19):
        assert warmup_cosine_lr(step, spe, base, 1, total) == pytest.approx(
            0.4 * (1 + math.cos(math.pi * 1 / 150)) / 2)
    assert warmup_cosine_lr(75 * spe + 3, spe, base, 1, total) == pytest.approx(0.2)
    assert warmup_cosine_lr(149 * spe, spe, base, 1, total) == pytest.approx(
        0.4 * (1 + math.cos(math.pi * 149 / 150)) / 2)


def test_scheduler_sets_every_group_and_resumes():
    ps = make_params(numpy.random.default_rng(4))
    opt = SGD([{"params": ps[:1]}, {"params": ps[1:], "weight_decay": 0}], lr=0.4)
    sched = WarmupCosineLR(opt, steps_per_epoch=5, warmup_epochs=1, max_epoch=4)
    lrs = [sched.step() for _ in range(12)]
    assert lrs[0] == pytest.approx(0.08) and lrs[4] == pytest.approx(0.4)
    assert opt.param_groups[1]["lr"] == lrs[-1]
    resumed = WarmupCosineLR(opt, 5, 1, 4)
    resumed.load_state_dict(sched.state_dict())
    assert resumed.step() == pytest.approx(sched.step())
