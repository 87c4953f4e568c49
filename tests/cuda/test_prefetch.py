"""DevicePrefetcher: the next batch's copy is issued on a side stream, from
pinned memory, before the current batch is handed out, and every ordering it
relies on is in place. Without a GPU a recording stand-in for CuPy logs each
call; on a GPU the real one moves real batches."""
import types

import numpy as np
import pytest

from minitorch_gx.cuda.prefetch import DevicePrefetcher
from tests.backends import host, needs_gpu


class _Log(list):
    pass


def _fake_cupy(log):
    """The few CuPy calls the prefetcher makes, each appended to ``log``."""
    class Event:
        count = 0

        def __init__(self):
            Event.count += 1
            self.name = f"event{Event.count}"

        def record(self, stream=None):
            log.append(("record", self.name, "side" if stream is not None else "compute"))

        def synchronize(self):
            log.append(("host waits", self.name))

    class Stream:
        def __init__(self, non_blocking=False):
            assert non_blocking  # never synchronises with the default stream
            log.append(("new side stream",))

        def wait_event(self, event):
            log.append(("side waits", event.name))

    class Compute:
        def wait_event(self, event):
            log.append(("compute waits", event.name))

    class Array(np.ndarray):
        def set(self, src, stream=None):
            assert stream is not None, "the copy must go to the side stream"
            assert any(np.shares_memory(src, np.frombuffer(b, np.uint8)) for b in pinned), \
                "copied from a pinned buffer"
            log.append(("copy on side", src.shape))
            np.copyto(self.view(np.ndarray), src)

    pinned = []

    def alloc_pinned_memory(nbytes):
        buf = bytearray(nbytes)
        log.append(("pinned alloc", nbytes))
        pinned.append(buf)
        return buf

    def empty(shape, dtype):
        log.append(("alloc on compute", tuple(shape)))
        return np.empty(shape, dtype).view(Array)

    cuda = types.SimpleNamespace(Event=Event, Stream=Stream, alloc_pinned_memory=alloc_pinned_memory,
                                 get_current_stream=Compute)
    return types.SimpleNamespace(cuda=cuda, empty=empty)


def _batches(n):
    rng = np.random.default_rng(0)
    return [(rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8), rng.integers(0, 10, 2))
            for _ in range(n)]


def test_the_next_copy_is_issued_before_the_current_batch_is_handed_out():
    log, batches = _Log(), _batches(3)
    checked = []
    prefetcher = DevicePrefetcher(batches, check=lambda b: checked.append(b[1]), xp=_fake_cupy(log))
    got = []
    for images, labels in prefetcher:
        log.append(("step", len(got)))
        got.append((host(images).copy(), host(labels).copy()))
    for (a, b), (c, d) in zip(got, batches):
        assert np.array_equal(a, c) and np.array_equal(b, d)
    assert len(got) == 3 and len(checked) == 3
    steps = [i for i, e in enumerate(log) if e[0] == "step"]
    copies = [i for i, e in enumerate(log) if e[0] == "copy on side"]
    assert len(copies) == 6  # images and labels of each batch
    # batch i + 1's copies come before step i runs (the copy overlaps it)
    assert copies[2] < steps[0] and copies[4] < steps[1]
    # before each step the compute stream waits for its batch's "ready" event
    readies = [e[1] for e in log if e[0] == "record" and e[2] == "side"]
    waits = [e[1] for e in log if e[0] == "compute waits"]
    assert waits == readies
    for i, step in enumerate(steps):
        assert log[step - 1] == ("compute waits", readies[i])
    # the side stream waits for the compute stream's event before writing
    for i, e in enumerate(log):
        if e[0] == "copy on side" and (i == 0 or log[i - 1][0] != "copy on side"):
            assert log[i - 1][0] == "side waits"
            assert log[i - 2][0] == "record" and log[i - 2][2] == "compute"
            assert log[i - 1][1] == log[i - 2][1]


def test_a_pinned_buffer_is_refilled_only_after_its_previous_copy_is_done():
    log = _Log()
    list(DevicePrefetcher(_batches(4), xp=_fake_cupy(log)))
    readies = [e[1] for e in log if e[0] == "record" and e[2] == "side"]
    host_waits = [e[1] for e in log if e[0] == "host waits"]
    # two alternating buffers: batch i + 2 waits for the copy of batch i
    assert host_waits == readies[:2]
    assert sum(1 for e in log if e[0] == "pinned alloc") == 2


def test_a_bad_batch_is_refused_on_the_host_before_anything_moves():
    log = _Log()

    def check(batch):
        if batch[1].max() >= 5:
            raise ValueError("label out of range")
    batches = [(np.zeros((1, 2, 2, 3), np.uint8), np.array([7]))]
    with pytest.raises(ValueError, match="out of range"):
        list(DevicePrefetcher(batches, check=check, xp=_fake_cupy(log)))
    assert not [e for e in log if e[0] == "copy on side"]


def test_device_batches_pass_through_untouched():
    log = _Log()
    fake = _fake_cupy(log)
    on_device = fake.empty((1, 2, 2, 3), np.uint8)
    log.clear()
    (images, labels), = list(DevicePrefetcher([(on_device, np.array([1]))], xp=fake))
    assert images is on_device  # no copy
    assert [e[0] for e in log].count("copy on side") == 1  # the host labels only


@needs_gpu
def test_prefetched_batches_on_a_gpu_equal_the_host_batches():
    batches = _batches(5)
    for (images, labels), (a, b) in zip(DevicePrefetcher(batches), batches):
        assert np.array_equal(host(images), a) and np.array_equal(host(labels), b)


def test_a_second_pass_reuses_the_pinned_buffers():
    """The trainer keeps one prefetcher for the run: every epoch after the
    first copies through the same two pinned buffers."""
    log = _Log()
    batches = _batches(3)
    prefetcher = DevicePrefetcher(batches, xp=_fake_cupy(log))
    for _ in range(2):
        got = [host(images).copy() for images, _ in prefetcher]
        assert all(np.array_equal(a, b) for a, (b, _) in zip(got, batches))
    assert sum(1 for e in log if e[0] == "pinned alloc") == 2
