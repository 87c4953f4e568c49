"""minitorch_gx.cpu: the NumPy path's threads and memory. Threads split
passes in fixed blocks, so every op gives the same bits with 1, 2 or 3
threads; retained memory means a repeated large allocation faults (almost) no page."""
import platform
import resource
import threading

import numpy as np
import pytest

import minitorch_gx as mt
from minitorch_gx import cpu, functional as F
from minitorch_gx.cuda import device as cuda_device
from minitorch_gx.ops import basic, conv, norm
from minitorch_gx.optim import sgd


def test_blocks_cover_the_rows_in_order_and_depend_only_on_the_counts():
    assert cpu.blocks(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert cpu.blocks(2, 8) == [(0, 1), (1, 2)]
    assert cpu.blocks(7, 1) == [(0, 7)]


def test_run_blocks_returns_the_results_in_block_order(monkeypatch):
    monkeypatch.setenv("MINITORCH_GX_THREADS", "3")
    assert cpu.run_blocks(lambda a, b: (a, b), 9) == [(0, 3), (3, 6), (6, 9)]
    assert cpu.run_blocks(lambda a, b: (a, b), 9, min_rows=5) == [(0, 9)]  # too small to split
    # a block asking for blocks runs them in place (no waiting on busy threads)
    nested = cpu.run_blocks(lambda a, b: cpu.run_blocks(lambda c, d: (c, d), 4), 6)
    assert nested == [[(0, 4)]] * 3


@pytest.mark.parametrize("value", ["two", "0", "-1"])
def test_a_bad_thread_count_is_one_clear_error(monkeypatch, value):
    monkeypatch.setenv("MINITORCH_GX_THREADS", value)
    with pytest.raises(ValueError, match="MINITORCH_GX_THREADS"):
        cpu.threads()


def test_the_thread_count_follows_the_settings(monkeypatch):
    monkeypatch.delenv("MINITORCH_GX_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert cpu.threads() == 5
    monkeypatch.setenv("MINITORCH_GX_THREADS", "2")
    assert cpu.threads() == 2


def _step_outputs():
    """Every threaded NumPy pass of a bottleneck, forward and backward."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64, 14, 14)).astype(np.float32)
    gy = rng.standard_normal((4, 64, 14, 14)).astype(np.float32)
    W = rng.standard_normal((64, 2, 3, 3)).astype(np.float32)
    gamma, beta = (rng.standard_normal(64).astype(np.float32) for _ in range(2))
    out = []
    for stride in (1, 2):
        y = conv.conv2d_forward(x, W, (stride, stride), (1, 1), 32)
        out += [y, conv.conv2d_backward_data(y, W, x.shape, (stride, stride), (1, 1), 32),
                conv.conv2d_backward_weight(y, x, W.shape, (stride, stride), (1, 1), 32)]
    y, mean, invstd = norm._train_forward_fast(x, gamma, beta, 1e-5, True, None, None, 0.1)
    out += [y, mean, invstd, *norm._backward_fast(gy, x, gamma, beta, mean, invstd, True, y=y),
            *norm._backward_fast(gy, x, gamma, beta, mean, invstd, False)]
    out += [basic._add_relu_forward_fast(x, gy), basic._relu_backward_fast(gy, x),
            basic._add_arrays_fast(x, gy)]
    # CNHW memory, the NumPy path's activations: folded grouped convolutions
    # (8 outputs per group), 1x1 GEMMs over the batch, batch norm by rows
    xc, gyc = (np.ascontiguousarray(a.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)
               for a in (x, gy))
    W8 = rng.standard_normal((64, 8, 3, 3)).astype(np.float32)
    W1 = rng.standard_normal((32, 64, 1, 1)).astype(np.float32)
    for stride in (1, 2):
        y = conv.conv2d_forward(xc, W8, (stride, stride), (1, 1), 8)
        out += [y, conv.conv2d_backward_data(y, W8, x.shape, (stride, stride), (1, 1), 8),
                conv.conv2d_backward_weight(y, xc, W8.shape, (stride, stride), (1, 1), 8)]
    y = conv.conv2d_forward(xc, W1, (1, 1), (0, 0), 1)
    out += [y, conv.conv2d_backward_data(y, W1, x.shape, (1, 1), (0, 0), 1),
            conv.conv2d_backward_weight(y, xc, W1.shape, (1, 1), (0, 0), 1)]
    # the stem's kind: one group, its blocks of images split over the threads,
    # the weight gradient's partial sums added in order
    image = xc[:, :3]
    assert cuda_device.is_cnhw(image) and conv._folds(image, conv._Geometry(
        image.shape, (64, 3, 7, 7), (2, 2), (3, 3), 1))
    W7 = rng.standard_normal((64, 3, 7, 7)).astype(np.float32)
    y = conv.conv2d_forward(image, W7, (2, 2), (3, 3), 1)
    out += [y, conv.conv2d_backward_weight(y, image, W7.shape, (2, 2), (3, 3), 1)]
    y, mean, invstd = norm._train_forward_fast(xc, gamma, beta, 1e-5, True, None, None, 0.1)
    out += [y, mean, invstd, *norm._backward_fast(gyc, xc, gamma, beta, mean, invstd, True, y=y)]
    p, g, buf = (rng.standard_normal(5000).astype(np.float32) for _ in range(3))
    sgd._sgd_update_fast(p, g, buf, 0.1, 0.9, 1e-4, np.empty_like(p))
    return out + [p, buf]


def _split_every_pass(monkeypatch):
    """Passes of 512 elements and more split, the cores awake or not."""
    monkeypatch.setattr(cpu, "MIN_BLOCK_ELEMENTS", 256)
    monkeypatch.setattr(cpu, "MIN_BLOCK_ELEMENTS_AWAKE", 256)


def test_threads_never_change_a_result(monkeypatch):
    _split_every_pass(monkeypatch)  # split even these small arrays
    monkeypatch.setattr(conv, "THREADED_MIN_MACS", 0)  # and every convolution's blocks
    monkeypatch.setattr(conv, "FOLD_BYTES", 30000)  # blocks of groups and of images
    monkeypatch.setattr(conv, "FOLD_MAX_PIXELS", 1 << 30)  # fold these 14x14 maps too
    results = {}
    for count in ("1", "2", "3"):
        monkeypatch.setenv("MINITORCH_GX_THREADS", count)
        results[count] = _step_outputs()
    for count in ("2", "3"):
        for i, (a, b) in enumerate(zip(results[count], results["1"])):
            assert a.tobytes() == b.tobytes(), f"output {i} differs with {count} threads"


def test_threaded_passes_equal_their_references(monkeypatch):
    _split_every_pass(monkeypatch)
    monkeypatch.setattr(cpu, "PIECE_ELEMENTS", 1000)  # pieces that end mid-row
    monkeypatch.setenv("MINITORCH_GX_THREADS", "2")
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 3, 33, 35)), rng.standard_normal((2, 3, 33, 35))
    assert np.array_equal(basic._add_relu_forward_fast(a, b), np.maximum(a + b, 0))
    assert np.array_equal(basic._relu_backward_fast(a, b), a * (b > 0))
    assert np.array_equal(basic._add_arrays_fast(a, b), a + b)
    # CNHW memory: the result keeps it
    ac = np.ascontiguousarray(a.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)
    bc = np.ascontiguousarray(b.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)
    y = basic._add_relu_forward_fast(ac, bc)
    assert np.array_equal(y, np.maximum(a + b, 0)) and y.strides == ac.strides
    # mixed layouts fall back to plain NumPy, still right
    assert np.array_equal(basic._add_arrays_fast(ac, b), a + b)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="retaining freed memory is a glibc malloc setting")
def test_retained_memory_makes_a_repeated_allocation_fault_no_page():
    assert cpu.retain_freed_memory()  # (import minitorch_gx did it already)
    big = 64 << 20  # 64 MiB, far above glibc's own mapping threshold

    def churn():
        for _ in range(5):
            a = np.ones(big // 4, np.float32)
            a += 1
            del a
    churn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    churn()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # without retention each 64 MiB allocation faults its pages again: >= 32
    # faults even with 2 MiB huge pages, 16,384 with 4 KiB pages
    assert faults < 32, f"{faults} page faults for 5 reused 64 MiB allocations"


def _input(kind):
    rng = np.random.default_rng(2)
    if kind == "nchw":
        return rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    from resnext.transforms import normalize  # train.py's input: CNHW memory, kept by every op
    return normalize(rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))


@pytest.mark.parametrize("arch, kind, steps", [("resnext_mini", "nchw", 2),
                                               ("resnext_mini", "cnhw", 2),  # the demo's
                                               ("resnext50_32x4d", "cnhw", 1)])
def test_a_training_step_is_the_same_with_one_thread_and_two(monkeypatch, arch, kind, steps):
    from minitorch_gx.optim import SGD
    from resnext.model import build_model
    x, labels = _input(kind), np.random.default_rng(3).integers(0, 10, 4)
    _split_every_pass(monkeypatch)
    monkeypatch.setattr(conv, "THREADED_MIN_MACS", 0)
    params = {}
    for count in ("1", "2"):
        monkeypatch.setenv("MINITORCH_GX_THREADS", count)
        model = build_model(arch, 10, seed=0).train()
        opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(mt.Tensor(x)), labels, 0.1).backward()
            opt.step()
        params[count] = [p.data.copy() for p in model.parameters()]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(params["1"], params["2"]))


_STEP_DIGEST = """
import hashlib, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import minitorch_gx as mt
from minitorch_gx import functional as F
from minitorch_gx.optim import SGD
from resnext.model import build_model
from resnext.transforms import normalize
x = normalize(np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
labels = np.random.default_rng(3).integers(0, 10, 4)
model = build_model("resnext_mini", 10, seed=0).train()
opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
for _ in range(2):
    opt.zero_grad()
    F.cross_entropy(model(mt.Tensor(x)), labels, 0.1).backward()
    opt.step()
print(hashlib.sha256(b"".join(p.data.tobytes() for p in model.parameters())).hexdigest())
"""


def test_retaining_freed_memory_changes_no_bit_of_a_training_run():
    """The README says the demo's result does not depend on memory retention:
    two steps in fresh processes, retention on and off, the same parameters."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digests = {}
    for retain in ("1", "0"):
        env = dict(os.environ, MINITORCH_GX_RETAIN_MEMORY=retain)
        digests[retain] = subprocess.run([sys.executable, "-c", _STEP_DIGEST, root], env=env,
                                         capture_output=True, text=True,
                                         check=True).stdout.split()[-1]
    assert len(digests["1"]) == 64 and digests["1"] == digests["0"]


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_forked_child_gets_threads_of_its_own(monkeypatch):
    """A loader worker is a fork of a process whose pool threads it lacks:
    work it splits must still run, not wait for threads that do not exist."""
    import os
    monkeypatch.setenv("MINITORCH_GX_THREADS", "2")
    assert cpu.run_blocks(lambda a, b: b - a, 4) == [2, 2]  # the parent's pool exists now
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the split work ran
        try:
            os._exit(0 if cpu.run_blocks(lambda a, b: b - a, 4) == [2, 2] else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.skipif(cpu._blas_threads is None, reason="NumPy's BLAS is not an OpenBLAS found here")
def test_gemms_in_blocks_run_on_one_blas_thread_whatever_the_thread_count(monkeypatch):
    """A GEMM's bits can depend on OpenBLAS's thread count: the count inside
    a block must not depend on threads(), and OpenBLAS gets its own back."""
    get, put = cpu._blas_threads
    put(2)
    seen = []
    for count in ("1", "2", "3"):
        monkeypatch.setenv("MINITORCH_GX_THREADS", count)
        cpu.run_blocks(lambda a, b: seen.append(get()), 1 << 20)
        cpu.run_blocks(lambda a, b: seen.append(get()), 10)  # one block, run in place
        assert get() == 2
    assert seen and set(seen) == {1}


def test_side_by_side_runs_the_second_piece_on_another_thread_at_the_same_time(monkeypatch):
    """With two threads each piece waits at a barrier for the other: run one
    after the other they could not both pass it (BrokenBarrierError, not a hang)."""
    monkeypatch.setenv("MINITORCH_GX_THREADS", "2")
    meet = threading.Barrier(2, timeout=10)

    def piece(name):
        def run():
            meet.wait()
            return name, threading.get_ident()
        return run

    (a, here), (b, there) = cpu.side_by_side(piece("first"), piece("second"))
    assert (a, b) == ("first", "second")
    assert here == threading.get_ident() and there != here


@pytest.mark.parametrize("where", ["one thread", "inside a block"])
def test_side_by_side_runs_the_pieces_in_turn_here_when_the_threads_are_busy_or_one(
        monkeypatch, where):
    monkeypatch.setenv("MINITORCH_GX_THREADS", "1" if where == "one thread" else "2")
    order = []

    def piece(name):
        def run():
            order.append((name, threading.get_ident()))
            return name
        return run

    def pair():
        return cpu.side_by_side(piece("first"), piece("second"))

    if where == "one thread":
        assert pair() == ("first", "second")
        here = threading.get_ident()
    else:
        [[result, here]] = cpu.run_blocks(lambda a, b: (pair(), threading.get_ident()), 1)
        assert result == ("first", "second")
    assert order == [("first", here), ("second", here)]


def test_side_by_side_waits_for_the_second_piece_when_the_first_raises(monkeypatch):
    """The second piece writes into arrays the caller owns: it must be done
    before an exception from the first reaches the caller."""
    import time
    monkeypatch.setenv("MINITORCH_GX_THREADS", "2")
    done = []

    def first():
        raise RuntimeError("first failed")

    def second():
        time.sleep(0.2)
        done.append(True)

    with pytest.raises(RuntimeError, match="first failed"):
        cpu.side_by_side(first, second)
    assert done == [True]
    with pytest.raises(ZeroDivisionError):  # and the second's own error reaches the caller
        cpu.side_by_side(lambda: None, lambda: 1 / 0)


@pytest.mark.skipif(cpu._blas_threads is None, reason="NumPy's BLAS is not an OpenBLAS found here")
def test_side_by_side_gemms_run_on_one_blas_thread_whatever_the_thread_count(monkeypatch):
    get, put = cpu._blas_threads
    put(2)
    seen = []
    for count in ("1", "2", "3"):
        monkeypatch.setenv("MINITORCH_GX_THREADS", count)
        cpu.side_by_side(lambda: seen.append(get()), lambda: seen.append(get()))
        assert get() == 2
    assert len(seen) == 6 and set(seen) == {1}


def test_passes_without_gemms_leave_openblas_alone(monkeypatch):
    """Batch norm and the element-wise passes run no GEMM, so they skip the
    one-BLAS-thread setting (60 us after a GEMM here); convolutions keep it."""
    count, sets = [2], []
    monkeypatch.setattr(cpu, "_blas_threads", (lambda: count[0], lambda n: sets.append(n)))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8, 6, 6)).astype(np.float32)
    ones = np.ones(8, np.float32)
    y, mean, invstd = norm._train_forward_fast(x, ones, ones, 1e-5, True, None, None, 0.1)
    norm._backward_fast(x, x, ones, ones, mean, invstd, True, y=y)
    basic._add_relu_forward_fast(x, x)
    p, g, buf = (rng.standard_normal(50).astype(np.float32) for _ in range(3))
    sgd._sgd_update_fast(p, g, buf, 0.1, 0.9, 1e-4, np.empty_like(p))
    assert sets == []
    conv.conv2d_forward(x, rng.standard_normal((8, 2, 3, 3)).astype(np.float32), (1, 1), (1, 1), 4)
    assert sets == [1, 2]


@pytest.mark.parametrize("setup, expected", [
    ("", "4"),                                   # minitorch_gx first: OpenBLAS's threads sleep
    ("import os; os.environ['OPENBLAS_THREAD_TIMEOUT'] = '9'; ", "9"),  # the user's value stays
    ("import numpy; ", None)])                   # too late once NumPy loaded OpenBLAS: untouched
def test_importing_minitorch_gx_first_lets_openblas_threads_sleep(setup, expected):
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    code = setup + "import minitorch_gx, os; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()[-1]
    assert out == str(expected)


def test_blas_core_names_the_kernels_openblas_runs():
    """Where the environment names OpenBLAS's kernels (OPENBLAS_CORETYPE, as
    on this project's machines), blas_core() names those; elsewhere the ones
    OpenBLAS picked (None only with another BLAS)."""
    import os
    core = cpu.blas_core()
    forced = os.environ.get("OPENBLAS_CORETYPE")
    if cpu._blas_threads is None:
        assert core is None
    elif forced:
        assert core.lower() == forced.lower()
    else:
        assert isinstance(core, str) and core.isprintable() and core


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_into_is_maximum_with_zero_to_the_bit(dtype):
    rng = np.random.default_rng(5)
    a = rng.standard_normal((3, 7, 11)).astype(dtype)
    a[0, 0, :4] = [np.nan, -0.0, np.inf, -np.inf]
    expected = np.maximum(a, 0)
    b = a.copy()
    assert cpu.relu_into(b) is b
    assert b.tobytes() == expected.tobytes()
    for length in (20, 5):  # a longer row of zeros kept, then a slice of it
        c = rng.standard_normal((4, length)).astype(dtype)
        assert cpu.relu_into(c.copy()).tobytes() == np.maximum(c, 0).tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_gradient_into_gives_the_bits_of_gy_times_the_mask(dtype):
    """Also for a negative gy masked (-0), NaN and infinite gy and y, -0 and
    subnormal y, and with out being y itself (the batch-norm backward's use)."""
    rng = np.random.default_rng(6)
    gy = rng.standard_normal(40).astype(dtype)
    y = np.maximum(rng.standard_normal(40), 0).astype(dtype)
    tiny = np.finfo(dtype).smallest_subnormal
    gy[:8] = [np.nan, np.inf, -np.inf, -1.5, np.nan, 2.0, -3.0, 0.5]
    y[:8] = [0.0, 0.0, 1.0, 0.0, 2.0, np.nan, -0.0, tiny]
    with np.errstate(invalid="ignore"):  # inf * 0, masked: NaN on both sides
        expected = (gy * (y > 0)).tobytes()
        out = np.empty_like(gy)
        assert cpu.relu_gradient_into(out, gy, y) is out and out.tobytes() == expected
        y_in_place = y.copy()
        assert cpu.relu_gradient_into(y_in_place, gy, y_in_place).tobytes() == expected


@pytest.mark.skipif(cpu._blas_threads is None, reason="NumPy's BLAS is not an OpenBLAS found here")
def test_callers_on_several_threads_give_openblas_its_threads_back(monkeypatch):
    get, put = cpu._blas_threads
    put(2)
    monkeypatch.setenv("MINITORCH_GX_THREADS", "2")
    seen = []

    def caller():
        for _ in range(200):
            cpu.run_blocks(lambda a, b: seen.append(get()), 1 << 20)

    callers = [threading.Thread(target=caller) for _ in range(3)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert set(seen) == {1} and get() == 2


def _keepers():
    return [t for t in threading.enumerate() if t.name == "minitorch_gx-awake" and t.is_alive()]


needs_spinlock = pytest.mark.skipif(
    cpu._spinlock_calls() is None or not hasattr(__import__("os"), "SCHED_IDLE"),
    reason="keepers need glibc's pthread_spin_lock and SCHED_IDLE (Linux)")


@needs_spinlock
def test_cores_awake_spins_idle_priority_keepers_until_the_outermost_with_ends(monkeypatch):
    import os
    import time
    monkeypatch.setenv("MINITORCH_GX_THREADS", "2")
    monkeypatch.delenv("MINITORCH_GX_KEEP_AWAKE", raising=False)
    assert _keepers() == []
    with cpu.cores_awake() as outer:
        assert outer.started and len(_keepers()) == 2
        deadline = time.monotonic() + 5
        while not all(os.sched_getscheduler(t.native_id) == os.SCHED_IDLE for t in _keepers()):
            assert time.monotonic() < deadline, "keepers never reached SCHED_IDLE"
            time.sleep(0.01)
        # they spin: the process gains CPU time while this thread sleeps
        before = sum(os.times()[:2])
        time.sleep(0.5)
        assert sum(os.times()[:2]) - before > 0.1
        with cpu.cores_awake() as inner:
            assert inner.started
        assert len(_keepers()) == 2  # the inner with's end stops nothing
    assert _keepers() == []
    before = sum(os.times()[:2])
    time.sleep(0.3)
    assert sum(os.times()[:2]) - before < 0.1  # nothing spins after


@pytest.mark.parametrize("setting", [{"MINITORCH_GX_KEEP_AWAKE": "0"},
                                     {"MINITORCH_GX_THREADS": "1"}])
def test_cores_awake_starts_nothing_when_off_or_with_one_thread(monkeypatch, setting):
    monkeypatch.setenv("MINITORCH_GX_THREADS", "2")
    for name, value in setting.items():
        monkeypatch.setenv(name, value)
    with cpu.cores_awake() as awake:
        assert not awake.started and _keepers() == []


def test_a_bad_keep_awake_setting_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("MINITORCH_GX_KEEP_AWAKE", "yes")
    with pytest.raises(ValueError, match="MINITORCH_GX_KEEP_AWAKE='yes'"):
        cpu.keep_awake_enabled()


@needs_spinlock
def test_a_keeper_that_cannot_lower_its_priority_does_not_spin(monkeypatch):
    import os
    import time

    def refuse(*args):
        raise PermissionError("no SCHED_IDLE here")
    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    monkeypatch.setenv("MINITORCH_GX_THREADS", "2")
    with cpu.cores_awake():
        deadline = time.monotonic() + 5
        while _keepers():  # each returns at once instead of spinning at normal priority
            assert time.monotonic() < deadline, "a keeper spins at normal priority"
            time.sleep(0.01)
    assert _keepers() == []


@needs_spinlock
def test_passes_split_from_a_smaller_size_while_the_cores_are_kept_awake(monkeypatch):
    """A hand-off to a core that halted costs 0.1-0.8 ms; to one kept awake
    much less, so inside cores_awake passes of 1M elements split, outside
    only those of 4M (the two thresholds of min_block_elements)."""
    monkeypatch.setenv("MINITORCH_GX_THREADS", "2")
    ran = []

    def pass_over(a):
        ran.append(threading.get_ident())

    def threads_used(n):
        ran.clear()
        cpu.elementwise(pass_over, *(np.zeros(n, np.float32),))
        return len(set(ran))

    n = 3 * cpu.MIN_BLOCK_ELEMENTS_AWAKE  # between twice the awake threshold and twice the other
    assert 2 * cpu.MIN_BLOCK_ELEMENTS_AWAKE <= n < 2 * cpu.MIN_BLOCK_ELEMENTS
    assert cpu.min_block_elements() == cpu.MIN_BLOCK_ELEMENTS and threads_used(n) == 1
    with cpu.cores_awake() as awake:
        assert awake.started and cpu.min_block_elements() == cpu.MIN_BLOCK_ELEMENTS_AWAKE
        assert threads_used(n) == 2
    assert cpu.min_block_elements() == cpu.MIN_BLOCK_ELEMENTS and threads_used(n) == 1


@needs_spinlock
def test_keeping_the_cores_awake_changes_no_bit(monkeypatch):
    monkeypatch.setenv("MINITORCH_GX_THREADS", "2")
    _split_every_pass(monkeypatch)  # every pass split: hand-offs
    monkeypatch.setattr(conv, "THREADED_MIN_MACS", 0)
    asleep = _step_outputs()
    with cpu.cores_awake() as awake:
        assert awake.started
        awake_outputs = _step_outputs()
    for i, (a, b) in enumerate(zip(awake_outputs, asleep)):
        assert a.tobytes() == b.tobytes(), f"output {i} differs with the keepers"


@needs_spinlock
@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_child_forked_inside_cores_awake_has_no_keepers_to_stop(monkeypatch):
    import os
    monkeypatch.setenv("MINITORCH_GX_THREADS", "2")
    with cpu.cores_awake() as awake:
        pid = os.fork()
        if pid == 0:  # the child: its own with starts keepers of its own, and ends them
            try:
                with cpu.cores_awake() as child:
                    ok = child.started and len(_keepers()) == 2
                ok = ok and _keepers() == []
                awake.__exit__(None, None, None)  # leaving the parent's with, inherited
                with cpu.cores_awake() as again:  # still counts from zero
                    ok = ok and again.started
                os._exit(0 if ok and _keepers() == [] else 1)
            finally:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
