"""The learning-rate schedule (minitorch_gx/optim/lr_scheduler.py) against its
formula: linear warm-up per step, then a cosine over epochs."""
import math

import numpy
import pytest

from minitorch_gx.nn import Parameter
from minitorch_gx.optim import SGD, WarmupCosineLR, warmup_cosine_lr


def make_params(rng, dtype=numpy.float64):
    return [Parameter(rng.standard_normal(s).astype(dtype)) for s in [(3, 2), (5,), (2, 2, 3)]]


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
