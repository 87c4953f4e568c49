"""Run under mpirun: data-parallel SGD against one process at the global batch.

For each model (an MLP without batch norm; a conv + batch norm + linear net):
1. Every rank initialises the model with its own random weights, then
   ``broadcast_parameters`` makes them rank 0's.
2. Each rank trains K steps of SGD (momentum, weight decay) on its shard of
   size b of a global batch of N*b, with a ``GradientAllreducer`` of tiny
   buckets between backward and step.
3. Rank 0 gathers every rank's parameters and BN statistics, then trains a
   fresh copy of the initial weights alone on the whole N*b batch.
Batch norm runs in eval mode for the comparison with one process (batch
statistics of b and N*b samples differ by design) and in train mode for
the check that parameters stay identical while BN statistics stay per rank.
Rank 0 prints one line "RESULT <json>" per run. With ``--flags`` the reducer
also carries flags in its last bucket (every rank sets count=1 each step and
checks the sum): the weights must come out the same.
"""
import json
import sys
from pathlib import Path

import numpy

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root
from minitorch_gx import distributed, nn  # noqa: E402
from minitorch_gx.functional import cross_entropy  # noqa: E402
from minitorch_gx.optim import SGD  # noqa: E402

STEPS, B, CLASSES = 4, 3, 3  # per-rank batch b = 3; inputs (., 2, 5, 5)


def build(kind):
    """A fresh model with this process's own random initial weights, float64."""
    if kind == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(50, 8), nn.ReLU(), nn.Linear(8, CLASSES))
    else:
        model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False),  # -> (., 4, 3, 3)
                              nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                              nn.Linear(36, CLASSES))
    return model.to(numpy.float64)


def global_batches(world):
    """The same K global batches of N*b samples on every rank."""
    rng = numpy.random.default_rng(7)
    for _ in range(STEPS):
        x = rng.standard_normal((world * B, 2, 5, 5))
        y = rng.integers(0, CLASSES, world * B)
        yield x, y


def make_optimizer(model):
    return SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def train_step(model, opt, x, y, reducer=None):
    opt.zero_grad()
    loss = cross_entropy(model(x), y, label_smoothing=0.1)
    loss.backward()
    if reducer is not None:
        if reducer.flag_names:
            reducer.set_flags(count=1)
        reducer.synchronize()
        if reducer.flag_names:
            assert reducer.flags == {"stop": 0.0, "count": reducer.world_size}, reducer.flags
    opt.step()


def run(kind, bn_training, ctx, flags=()):
    rank, world = ctx.rank, ctx.world_size
    model = build(kind)
    if kind == "conv":
        # non-trivial running statistics, different on every rank before the broadcast
        model[1].running_mean[...] = numpy.random.default_rng(rank).standard_normal(4)
    model.train(bn_training)
    opt = make_optimizer(model)
    distributed.broadcast_parameters(model)  # in place: SGD's flat views stay valid
    initial = {k: numpy.array(v, copy=True) for k, v in model.state_dict().items()}
    reducer = distributed.GradientAllreducer(model.parameters(), bucket_mb=200 / 2 ** 20,
                                             flags=flags)
    for x, y in global_batches(world):
        shard = slice(rank * B, (rank + 1) * B)
        train_step(model, opt, x[shard], y[shard], reducer)

    params = {name: p.data for name, p in model.named_parameters()}
    stats = {name: b for name, b in model.named_buffers() if "running" in name}
    everyone = ctx.comm.gather((params, stats), root=0)
    if rank != 0:
        return
    identical = all(numpy.array_equal(theirs[0][k], params[k]) for theirs in everyone for k in params)
    stats_differ = any(not numpy.array_equal(theirs[1][k], stats[k])
                       for theirs in everyone[1:] for k in stats)

    # one process, the whole global batch, the same initial weights
    alone = build(kind)
    alone.load_state_dict(initial)
    alone.train(bn_training)
    opt_alone = make_optimizer(alone)
    for x, y in global_batches(world):
        train_step(alone, opt_alone, x, y)
    diff = max(float(numpy.max(numpy.abs(p.data - params[name])))
               for name, p in alone.named_parameters())
    moved = max(float(numpy.max(numpy.abs(params[k] - initial[k]))) for k in params)
    print("RESULT " + json.dumps({"model": kind, "bn_training": bn_training, "world": world,
                                  "buckets": len(reducer.buckets), "identical": identical,
                                  "bn_stats_differ": stats_differ, "max_diff_vs_one_process": diff,
                                  "max_weight_change": moved, "flags": bool(flags)}),
          flush=True)


def main():
    ctx = distributed.init("cpu")
    distributed.install_failure_handler(ctx)
    flags = ("stop", "count") if "--flags" in sys.argv else ()
    kinds = [a for a in sys.argv[1:] if a != "--flags"] or ["mlp", "conv"]
    for kind in kinds:
        run(kind, bn_training=False, ctx=ctx, flags=flags)
        if kind == "conv":
            run(kind, bn_training=True, ctx=ctx, flags=flags)
    distributed.barrier()


if __name__ == "__main__":
    main()
