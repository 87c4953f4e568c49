"""Gradient averaging that overlaps backward: ``GradientAllreducer``.

Flat buckets of about ``bucket_mb`` MiB, filled in reverse registration order
(the order backward completes them); a post-accumulate-grad hook on every
parameter counts its bucket down, and a complete bucket starts a non-blocking
allreduce through the Context's transport while backward goes on. Buckets
are launched strictly by index, so every rank issues its collectives in the
same order. See the package docstring for the whole design.

Every bucket has the Context's deadline (``ctx.timeout``, deadlines.py): one
that has not completed that many seconds after it started ends the job with
``rank R: allreduce of gradient bucket i of n (step s) timed out ...`` and the
rank that did not answer.

Decisions taken by all ranks together (stop now, skip a non-finite step), at
no extra cost. A rank that stops alone leaves the others waiting in the next
allreduce; a rank that skips a step alone desynchronises the weights. So the
reducer can carry a few named flags inside its gradient allreduce:

    reducer = GradientAllreducer(params, flags=("stop", "nonfinite"))
    ...
    loss.backward()
    reducer.set_flags(stop=stop_requested, nonfinite=optimizer.nonfinite(loss))
    reducer.synchronize()
    if reducer.flags["nonfinite"] > 0: ...   # the same sums on every rank
    if reducer.flags["stop"] > 0: ...

The flags are a few extra elements at the end of the bucket launched last.
That bucket (the first layers' gradients) fills at the very end of backward, so
with flags it is started by ``synchronize()`` rather than by the last hook,
which loses no overlap and lets ``set_flags`` be called at any time up to
``synchronize()``: the values travel with this step's gradients and reflect
this rank's latest state. After ``synchronize()``, ``reducer.flags`` holds
their sums over the ranks, identical everywhere, so every rank takes the same
decision at the same step; then the values this rank set go back to 0. Give
small integers (a bool counts 1): they are summed in the gradients' dtype
(exact up to 2048 in float16). No collective is added. With one rank the same
calls work locally: ``flags`` is this rank's own values.

On a GPU a value may be a 0-d device array (a check computed there) and is
copied into the bucket on the device; ``flag_sum(name)`` gives a sum without
reading it back, for a kernel to consume (the trainer's SGD step skips on the
device when ``nonfinite`` is set). Reading ``flags`` waits for the device.
"""
import contextlib

import numpy

from .. import backend
from .process_group import get_context
from .transports import FlatBuffer


# --------------------------------------------------------------------------
# Gradient buckets
# --------------------------------------------------------------------------
class _Bucket(FlatBuffer):
    """Parameters whose gradients travel together in one flat buffer.

    flat: (size + extra,) of the parameters' dtype on their device; parameter i
    lives in ``flat[offsets[i]:offsets[i] + params[i].size]``; the last
    ``extra`` elements carry the reducer's flags (the last bucket only).
    """

    def __init__(self, index, count, params, transport, extra=0, dtype=None):
        self.index, self.count, self.params, self.extra = index, count, params, extra
        self.step = 0  # the reducer's step this bucket was last launched for
        self.offsets, size = [], 0
        for p in params:
            self.offsets.append(size)
            size += p.size
        self.size = size  # gradient elements
        xp = backend.get_array_module(params[0].data) if params else numpy
        dtype = params[0].dtype if params else dtype
        super().__init__(transport.new_buffer(size + extra, dtype, xp))  # (size + extra,)
        self.reset()

    def describe(self):
        return f"allreduce of gradient bucket {self.index} of {self.count} (step {self.step})"

    def reset(self):
        self.pending = len(self.params)  # gradients not yet complete this step
        self.packed = False
        self.started = False

    def pack(self):
        for p, off in zip(self.params, self.offsets):
            view = self.flat[off:off + p.size]
            if p.grad is None:  # unused this step: contributes zeros
                view.fill(0)
            else:
                view[...] = p.grad.reshape(-1)
        self.packed = True

    def unpack(self, world_size):
        xp = backend.get_array_module(self.flat)
        for p, off in zip(self.params, self.offsets):
            total = self.flat[off:off + p.size].reshape(p.shape)
            # In place when possible: the optimizer may hold p.grad as a view
            # into its own flat gradient.
            if p.grad is None or p.grad.shape != p.shape:
                p.grad = total / world_size
            else:
                xp.divide(total, world_size, out=p.grad)


class GradientAllreducer:
    """Averages the gradients of ``params`` over all ranks, overlapping backward.

        reducer = GradientAllreducer(model.parameters(), bucket_mb=25)
        loss.backward()          # buckets start reducing as they fill
        reducer.synchronize()    # wait, divide by world size, unpack into p.grad
        optimizer.step()

    Call ``synchronize()`` after every backward. To accumulate gradients over
    several backward passes, run all but the last inside ``no_sync()``.
    A parameter whose gradient is still None at ``synchronize()`` (unused
    this step) counts as zeros and receives the mean of the others.
    With one rank, nothing is registered and ``synchronize()`` returns at once
    (``flags`` then holds this rank's own values).

    flags: names of values summed over the ranks inside the last bucket, for
    decisions all ranks must take together (see the module docstring):
    ``set_flags(name=value)`` before ``synchronize()``, then ``flags[name]``.
    step_count: ``synchronize()`` calls done; the deadline's error line names
    step ``step_count + 1``. A trainer that resumes may set it to its global step.
    """

    def __init__(self, params, bucket_mb=25.0, ctx=None, flags=()):
        self.ctx = ctx or get_context()
        self.world_size = self.ctx.world_size
        self.params = [p for p in params if p.requires_grad]
        self.flag_names = tuple(flags)
        if len(set(self.flag_names)) != len(self.flag_names):
            raise ValueError(f"flag names repeat: {self.flag_names}")
        self._flag_values = [0.0] * len(self.flag_names)  # this rank's, for this step
        self._flag_sums = None   # the last step's sums (on the buckets' device)
        self._flags = None       # the same as a dict, made when first read
        self.step_count = 0
        self._sync_enabled = True
        self._ready = set()  # id of each parameter whose gradient is complete this step
        self._next = 0       # index of the next bucket to launch
        self.buckets = self._make_buckets(int(bucket_mb * 2 ** 20))
        self._where = {}     # id(param) -> its bucket
        for b in self.buckets:
            for p in b.params:
                self._where[id(p)] = b
        if self.world_size > 1:
            for p in self.params:
                p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def _make_buckets(self, cap_bytes):
        """Reverse registration order (the order backward completes them),
        closing a bucket once it holds ``cap_bytes`` or the dtype/device changes."""
        buckets, current, nbytes = [], [], 0
        for p in reversed(self.params):
            if current and (p.dtype != current[0].dtype
                            or backend.device_of(p.data) != backend.device_of(current[0].data)):
                buckets.append(current)
                current, nbytes = [], 0
            current.append(p)
            nbytes += p.data.nbytes
            if nbytes >= cap_bytes:
                buckets.append(current)
                current, nbytes = [], 0
        if current:
            buckets.append(current)
        if self.flag_names and not buckets:
            buckets.append([])  # nothing to reduce but the flags: a bucket of their own
        n, extra = len(buckets), len(self.flag_names)
        return [_Bucket(i, n, ps, self.ctx._transport, extra if i == n - 1 else 0,
                        numpy.float64) for i, ps in enumerate(buckets)]

    @property
    def bucket_sizes(self):
        """Gradient elements per bucket, in launch order (for logs and tests;
        the flags' slots are not counted)."""
        return [b.size for b in self.buckets]

    # -- flags -------------------------------------------------------------------
    def set_flags(self, **values):
        """This rank's values of the named flags for this step (numbers, a bool
        counting 1, or 0-d arrays on the buckets' device), sent with the
        gradients at the next ``synchronize()``."""
        for name, value in values.items():
            try:
                i = self.flag_names.index(name)
            except ValueError:
                carries = f"carries {self.flag_names}" if self.flag_names else "carries no flags"
                raise ValueError(f"unknown flag {name!r}: this reducer {carries}; name them "
                                 "all when making it: GradientAllreducer(params, "
                                 f"flags=({name!r}, ...))") from None
            self._flag_values[i] = value if hasattr(value, "shape") else float(value)

    def flag_sum(self, name):
        """The sum over the ranks of flag ``name`` at the latest ``synchronize()``,
        as it is: a 0-d array on the buckets' device (a number with one rank, or
        what this rank set), so a kernel can use it with no read-back."""
        i = self.flag_names.index(name)
        if self._flag_sums is None:
            return 0.0
        if isinstance(self._flag_sums, list):  # one rank: the values as they were set
            return self._flag_sums[i]
        return self._flag_sums[i, ...]  # a 0-d view, not a scalar read to the host

    @property
    def flags(self):
        """``{name: sum over the ranks}`` of the values set before the latest
        ``synchronize()``: the same on every rank (zeros before the first)."""
        if self._flags is None:
            sums = ([0.0] * len(self.flag_names) if self._flag_sums is None
                    else [float(backend.to_numpy(v)) for v in self._flag_sums])
            self._flags = dict(zip(self.flag_names, sums))
        return self._flags

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside accumulate locally; the first backward after
        the block reduces the accumulated gradients."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def _on_grad_ready(self, p):
        if not self._sync_enabled:
            return
        if id(p) in self._ready:
            raise RuntimeError("a gradient became ready twice before synchronize(): call "
                               "GradientAllreducer.synchronize() after every backward, or run "
                               "accumulating backward passes inside reducer.no_sync()")
        self._ready.add(id(p))
        bucket = self._where[id(p)]
        bucket.pending -= 1
        if bucket.pending == 0:
            bucket.pack()
            # with flags, the last bucket waits for synchronize() (set_flags until then)
            self._launch_in_order(len(self.buckets) - (1 if self.flag_names else 0))
        self.ctx._transport.progress()

    def _launch_in_order(self, end):
        """Start the packed buckets from ``self._next`` on, below index ``end``."""
        while self._next < end and self.buckets[self._next].packed:
            bucket = self.buckets[self._next]
            for j, value in enumerate(self._flag_values if bucket.extra else ()):
                slot = bucket.flat[bucket.size + j:bucket.size + j + 1]
                if isinstance(value, float):
                    slot.fill(value)   # a kernel argument: no host-to-device copy
                else:
                    slot[...] = value  # a device value, copied on the device
            bucket.step = self.step_count + 1
            self.ctx._transport.start(bucket)
            bucket.started = True
            self._next += 1

    def synchronize(self):
        """Wait for every bucket and leave the mean gradient in each ``p.grad``;
        ``flags`` then holds the flags' sums over the ranks."""
        if self.world_size == 1:
            self._finish_step(list(self._flag_values))
            return
        for b in self.buckets:
            if not b.packed:  # unused parameters, or backward ran inside no_sync()
                b.pack()
        self._launch_in_order(len(self.buckets))
        sums = None
        try:
            for b in self.buckets:
                self.ctx._transport.wait(b)
                b.unpack(self.world_size)
                if b.extra:
                    sums = b.flat[b.size:].copy()  # the next step packs over flat
        finally:
            for b in self.buckets:
                b.reset()
            self._ready.clear()
            self._next = 0
        self._finish_step(sums)

    def _finish_step(self, sums):
        self._flag_sums, self._flags = sums, None
        self._flag_values = [0.0] * len(self.flag_names)
        self.step_count += 1
