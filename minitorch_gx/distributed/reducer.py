"""Gradient averaging that overlaps backward: ``GradientAllreducer``.

Flat buckets of about ``bucket_mb`` MiB, filled in reverse registration order
(the order backward completes them); a post-accumulate-grad hook on every
parameter counts its bucket down, and a complete bucket starts a non-blocking
allreduce through the Context's transport while backward goes on. Buckets
are launched strictly by index, so every rank issues its collectives in the
same order. See the package docstring for the whole design.
"""
import contextlib

from .. import backend
from .process_group import get_context
from .transports import FlatBuffer


# --------------------------------------------------------------------------
# Gradient buckets
# --------------------------------------------------------------------------
class _Bucket(FlatBuffer):
    """Parameters whose gradients travel together in one flat buffer.

    flat: (size,) of the parameters' dtype on their device; parameter i lives in
    ``flat[offsets[i]:offsets[i] + params[i].size]``.
    """

    def __init__(self, index, params, transport):
        self.index, self.params = index, params
        self.offsets, size = [], 0
        for p in params:
            self.offsets.append(size)
            size += p.size
        xp = backend.get_array_module(params[0].data)
        super().__init__(transport.new_buffer(size, params[0].dtype, xp))  # (size,)
        self.reset()

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
    With one rank, nothing is registered and ``synchronize()`` returns at once.
    """

    def __init__(self, params, bucket_mb=25.0, ctx=None):
        self.ctx = ctx or get_context()
        self.world_size = self.ctx.world_size
        self.params = [p for p in params if p.requires_grad]
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
        return [_Bucket(i, ps, self.ctx._transport) for i, ps in enumerate(buckets)]

    @property
    def bucket_sizes(self):
        """Elements per bucket, in launch order (for logs and tests)."""
        return [b.flat.size for b in self.buckets]

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
            self._launch_in_order()
        self.ctx._transport.progress()

    def _launch_in_order(self):
        while self._next < len(self.buckets) and self.buckets[self._next].packed:
            bucket = self.buckets[self._next]
            self.ctx._transport.start(bucket)
            bucket.started = True
            self._next += 1

    def synchronize(self):
        """Wait for every bucket and leave the mean gradient in each ``p.grad``."""
        if self.world_size == 1:
            return
        for b in self.buckets:
            if not b.packed:  # unused parameters, or backward ran inside no_sync()
                b.pack()
        self._launch_in_order()
        try:
            for b in self.buckets:
                self.ctx._transport.wait(b)
                b.unpack(self.world_size)
        finally:
            for b in self.buckets:
                b.reset()
            self._ready.clear()
            self._next = 0
