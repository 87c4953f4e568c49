"""The next batch travels to the GPU while the current step runs.

    for images, labels in DevicePrefetcher(loader, check=check_batch):
        step(images, labels)          # device arrays; their copy is finished

Without it, ``cupy.asarray(batch)`` inside the step copies from pageable
memory on the compute stream: the copy waits for the step before it and the
step waits for the copy. Here each host batch is first written into one of
two page-locked (pinned) buffers, then copied by DMA on a side stream, and the
compute stream waits for that copy (a device-side event wait; the host never
waits for the device). The copy of batch i + 1 is issued before batch i is
handed out, so it runs while step i computes.

The order of operations, for each batch, is what makes this safe:
  1. the host checks the batch (``check``) and waits until the pinned buffer
     it is about to overwrite has been read by its previous copy (two batches
     back: long done);
  2. the device arrays are allocated on the compute stream, and an event
     recorded there: the side stream waits for it before writing, so memory
     CuPy's pool hands back from an array the compute stream still reads is
     never overwritten early;
  3. the copy is queued on the side stream, and an event ``ready`` after it;
  4. when the batch is handed out, the compute stream waits for ``ready``.
Arrays already on the device (``SyntheticBatches``) pass through untouched.
On the CPU the batches pass through as they are.
"""
import collections

import numpy

from .. import backend

_Queued = collections.namedtuple("_Queued", "arrays ready")


def _on_host(a):
    return type(a) is numpy.ndarray  # (a CuPy array is not one)


class DevicePrefetcher:
    """Iterate ``batches`` (tuples of host arrays) as tuples of device arrays,
    the copy of each issued one batch ahead on a side stream from pinned
    memory. ``check(batch)``, if given, runs on each host batch first (the
    labels' range, before they leave the host). ``xp``: the CuPy module
    (``backend.cupy``; tests pass a recording stand-in)."""

    def __init__(self, batches, check=None, xp=None):
        self.batches, self.check = batches, check
        self.xp = backend.cupy if xp is None else xp
        self._stream = None
        self._pinned = [(None, None)] * 2  # per slot: (buffer, event of the copy that last read it)
        self._slot = 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        batches = iter(self.batches)
        first = next(batches, None)
        queued = None if first is None else self._issue(first)
        while queued is not None:
            following = next(batches, None)
            upcoming = None if following is None else self._issue(following)  # before yielding
            if queued.ready is not None:
                self.xp.cuda.get_current_stream().wait_event(queued.ready)
            yield queued.arrays
            queued = upcoming

    def _issue(self, batch):
        if self.check is not None:
            self.check(batch)
        xp = self.xp
        host = [a for a in batch if _on_host(a)]
        if not host:
            return _Queued(tuple(batch), None)
        if self._stream is None:
            self._stream = xp.cuda.Stream(non_blocking=True)
        staged = self._stage(host)                           # 1. into pinned memory
        device = [xp.empty(a.shape, a.dtype) for a in host]  # 2. on the compute stream
        allocated = xp.cuda.Event()
        allocated.record()
        self._stream.wait_event(allocated)
        for d, s in zip(device, staged):                     # 3. DMA on the side stream
            d.set(s, stream=self._stream)
        ready = xp.cuda.Event()
        ready.record(self._stream)
        buffer, _ = self._pinned[self._slot]
        self._pinned[self._slot] = (buffer, ready)
        self._slot = 1 - self._slot
        moved = iter(device)
        return _Queued(tuple(next(moved) if _on_host(a) else a for a in batch),
                       ready)

    def _stage(self, arrays):
        """Copies of ``arrays`` in this slot's pinned buffer (grown when too small)."""
        buffer, last_copy = self._pinned[self._slot]
        if last_copy is not None:
            last_copy.synchronize()  # its previous copy has read it (two batches back)
        sizes = [-(-a.nbytes // 256) * 256 for a in arrays]  # each array 256-byte aligned
        if buffer is None or len(buffer) < sum(sizes):
            buffer = numpy.frombuffer(self.xp.cuda.alloc_pinned_memory(sum(sizes)), numpy.uint8,
                                      sum(sizes))
            self._pinned[self._slot] = (buffer, None)
        staged, offset = [], 0
        for a, size in zip(arrays, sizes):
            view = buffer[offset:offset + a.nbytes].view(a.dtype).reshape(a.shape)
            view[...] = a
            staged.append(view)
            offset += size
        return staged
