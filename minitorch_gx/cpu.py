"""The NumPy path's use of the machine: its memory and its cores.

Memory. A training step allocates its activations, frees them at the end of
backward, and allocates the same sizes again in the next step. glibc's
malloc gives each block of more than a few MiB its own mapping and returns it
to the kernel when freed (and trims the top of its heap); the next allocation
then maps fresh pages, and the kernel zeroes every page at its first touch.
On this project's 2-core machine touching 200 MB of fresh memory took 720 ms,
and a resnext50_32x4d step at batch 16 spent 2.5 to 5 s of its 7 to 9 in the
kernel on ~100,000 page faults. ``retain_freed_memory()`` asks glibc to keep
freed memory for reuse instead (``mallopt``: no per-block mappings, no
trimming), as the caching allocators of GPU frameworks do: after the first
step a batch-16 step faults 3 to 6 pages (83,000 to 88,300 without), and the
process's peak memory is about the one it reached anyway (+1.8%).
``import minitorch_gx`` calls it on glibc systems unless
``MINITORCH_GX_RETAIN_MEMORY=0``; elsewhere it does nothing. It changes no
bit of a result (tested).

Cores. ``threads()`` is how many threads the NumPy path splits its
element-wise and batch-norm passes over (NumPy releases the GIL inside a
ufunc): ``MINITORCH_GX_THREADS``, else ``OMP_NUM_THREADS``, else the cores
this process may run on. ``blocks(n)`` cuts n rows into that many fixed,
contiguous blocks and ``run_blocks(fn, n)`` runs ``fn(start, stop)`` on each,
one block per thread (a block that asks for blocks itself runs them in
place). The blocks depend only on n and the thread count, each
writes only its own rows, and partial sums are combined in block order, so
a result never depends on which thread ran first. A hand-off to a thread
costs far more on a VM than the "tens of microseconds" one might expect
(0.1 to 0.8 ms here once the thread has idled), so only work that gains more
than that is split: passes of at least 2 x ``min_block_elements()`` elements
(1M inside ``cores_awake``, below, 4M outside it), and the blocks of
images or groups of a convolution of 16M multiply-adds or more, each a
lowering and its GEMMs (``ops/conv.py``, THREADED_MIN_MACS).
``side_by_side(first, second)`` runs two independent pieces of work at once,
the second on a pool thread: a convolution's input and weight gradients,
whose small GEMMs and copies would leave the other core idle (``ops/conv.py``).

BLAS. OpenBLAS has threads of its own, right for one large GEMM (a 1x1
convolution over the batch). Inside a block of ``run_blocks`` the cores are
already busy, and two blocks' GEMMs each fanned out over OpenBLAS's threads
fought over them: the grouped convolutions of a batch-32 64x64 step took
0.22 s that way, 0.15 s with OpenBLAS on one thread (benchmarks/bench_conv.py
--only grouped). So while blocks run, OpenBLAS runs each GEMM on the calling
thread only (``openblas_set_num_threads``, found in the library NumPy
loaded; with another BLAS nothing is changed), and gets its threads back
when the blocks are done. A GEMM's result can depend on OpenBLAS's thread
count (here a (32, 784) @ (784, 64) product does); every GEMM in a block
runs on one BLAS thread, also when there is a single block, so results
still do not depend on ``threads()`` (tested). And OpenBLAS's idle threads
spin for about 2^28 cycles (~0.1 s) after each GEMM before they sleep, on
the cores this module's threads need next: with OPENBLAS_THREAD_TIMEOUT=4
(2^4 cycles) a batch-32 64x64 step took 826 and 952 ms against 926 and
1043 ms (two pairs of runs). OpenBLAS reads it once, when NumPy loads it,
so ``import minitorch_gx`` sets it only when NumPy is not imported yet
(train.py, eval.py and the benchmarks import minitorch_gx first), and never
over a value already in the environment. OpenBLAS picks its kernels by the
CPU it finds when it loads, unless OPENBLAS_CORETYPE names them; on this
project's current 2-core machine (AMD Zen 5) it picks its AVX-512 ones,
"SkylakeX", and OPENBLAS_CORETYPE=Haswell (AVX2) halves the speed of a
large GEMM (2048^3: 89.8 against 164.6 GMAC/s, medians of 6 alternating
rounds of benchmarks/bench_blas_kernels.py). ``blas_core()`` says which
kernels run.

Waking. A core with nothing to run halts, and on this VM waking a halted
core (for a pool thread handed a block, for OpenBLAS's threads at the next
GEMM) cost 0.1 to 0.8 ms: a 2M-element multiply split over two threads
took 0.6 to 1.0 ms against 0.35 to 0.55 on one, and 0.18 to 0.35 with the
cores kept busy (benchmarks/bench_cores_awake.py; in a calm hour 0.20 to
0.26 against 0.22 on one, and 0.16 to 0.17 kept busy). ``cores_awake()`` keeps
them busy for as long as it is entered: one keeper thread per thread of
``threads()`` spins in glibc's ``pthread_spin_lock`` (no GIL held) at
SCHED_IDLE, the policy the kernel runs only when nothing else wants the
core (its weight is 3 against a normal thread's 1024), so a thread that
wakes takes its core at once. It is the active wait of OpenMP runtimes
(OMP_WAIT_POLICY), kept below every other thread of this or any process;
the cost is that the cores show as busy while it lasts. train.py's loop,
eval.py's and bench_train.py's steps run inside it on the CPU;
``MINITORCH_GX_KEEP_AWAKE=0`` turns it off. A keeper that cannot lower its
priority does not spin. It changes no bit of a result (tested). Whole
training steps, keepers on and off in alternate ABBA rounds in one process:
at batch 32, 64x64 1091 against 1347 ms (8 of 10 rounds faster), 1055
against 1089 ms (8 of 12), 913 against 996 ms (10 of 12) and, in a calm
hour, 782 against 819 ms (8 of 10);
at batch 16, 224x224, whose passes are long enough to repay a wake-up,
4146 against 4137 ms (no difference).
"""
import concurrent.futures
import contextlib
import ctypes
import functools
import os
import platform
import threading

import numpy

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's malloc.h
# Work below this many elements per block runs on one thread
# (``min_block_elements``): a hand-off to a thread costs more than the
# second core saves on a short pass. On this project's 2-core VM a hand-off
# to a thread that had idled for a few milliseconds cost 0.1 to 0.8 ms (its
# core had halted). Inside ``cores_awake`` (train.py's and eval.py's loops,
# the benchmarks' steps) the cores do not halt, and smaller passes repay
# the split. Per-op timers within whole steps, the values alternating in
# ABBA rounds in one process (benchmarks/bench_min_block.py), batch norm and
# the element-wise passes of a step took, medians:
#   keepers on, batch 32, 64x64: 220.4 ms with 1 << 19 against 238.1 with
#     1 << 21 (14 rounds; in other runs 204.0 against 230.0, and 239.2 with
#     1 << 20, 227.2 with 1 << 19, 259.0 with 1 << 18);
#   keepers on, batch 16, 224x224: 757.1 against 912.6 ms (4 rounds);
#   keepers off, batch 32, 64x64: 250.0 with 1 << 19 against 241.5 with 1 << 21.
MIN_BLOCK_ELEMENTS = 1 << 21        # while the cores may halt between passes
MIN_BLOCK_ELEMENTS_AWAKE = 1 << 19  # inside cores_awake, its keepers running


def min_block_elements():
    """The fewest elements per block worth a thread, now (see above)."""
    return MIN_BLOCK_ELEMENTS_AWAKE if cores_awake._keepers else MIN_BLOCK_ELEMENTS


_retained = False


def retain_freed_memory():
    """Keep freed memory inside the process for reuse (glibc only); True if set."""
    global _retained
    if _retained:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
    except (OSError, AttributeError):
        return False
    _retained = bool(ok)
    return _retained


def threads():
    """The NumPy path's thread count (see the module docstring), at least 1."""
    for name in ("MINITORCH_GX_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value:
            try:
                count = int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not a whole number of threads") from None
            if count < 1:
                raise ValueError(f"{name}={value!r}: need at least 1 thread")
            return count
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


_pool, _pool_size, _pool_lock = None, 0, threading.Lock()


def _forget_pool_in_child():
    # A forked child (a loader worker) has none of the parent's threads: a
    # pool inherited from it would queue work that no thread ever runs.
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _executor(count):
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != count:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = concurrent.futures.ThreadPoolExecutor(count, thread_name_prefix="minitorch_gx")
            _pool_size = count
        return _pool


def blocks(n, count=None):
    """[(start, stop), ...]: n rows cut into at most ``count`` (default
    ``threads()``) contiguous blocks as equal as possible, in order."""
    count = max(1, min(threads() if count is None else count, n))
    edges = [n * i // count for i in range(count + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def run_blocks(fn, n, min_rows=1, gemms=True):
    """[fn(start, stop) for each block of ``blocks(n)``], the blocks run on
    the thread pool (the first on the calling thread); one block, run here,
    when n < 2 * min_rows or there is one thread. Results in block order.
    Every block's GEMMs run on one BLAS thread (see the module docstring);
    ``gemms=False`` says fn runs none, and skips that setting, which costs
    60 us right after a GEMM here (4 us otherwise)."""
    count = threads()
    if getattr(_inside, "pool", False):
        return [fn(0, n)]  # inside a block already: the threads are busy
    # a block's GEMMs on its own thread, however many blocks
    with _OneBlasThread() if gemms else contextlib.nullcontext():
        if count == 1 or n < 2 * min_rows:
            return [_in_pool(fn, 0, n)]
        parts = blocks(n, min(count, n // min_rows))
        pool = _executor(count)
        futures = [pool.submit(_in_pool, fn, a, b) for a, b in parts[1:]]
        first = _in_pool(fn, *parts[0])
        return [first] + [f.result() for f in futures]


def side_by_side(first, second):
    """(first(), second()): two independent pieces of work, ``second`` on a
    pool thread while ``first`` runs here; one after the other when there
    is one thread or when called from inside a block (the threads are busy
    then). Each piece runs as a block does: its GEMMs on one BLAS thread,
    its own ``run_blocks`` in place. Neither may read what the other writes;
    then the results are the same bits however the two were scheduled.
    ``second`` has finished when this returns, also when ``first`` raised."""
    count = threads()
    with _OneBlasThread():
        if count == 1 or getattr(_inside, "pool", False):
            return _in_block(first), _in_block(second)
        future = _executor(count).submit(_in_block, second)
        try:
            done_here = _in_block(first)
        except BaseException:
            concurrent.futures.wait([future])  # second never outlives the call
            raise
        return done_here, future.result()


def _in_block(fn):
    if getattr(_inside, "pool", False):
        return fn()
    return _in_pool(lambda start, stop: fn(), 0, 1)


_inside = threading.local()


def _openblas_call(name):
    """The function ``name`` (e.g. "get_num_threads") of the OpenBLAS NumPy
    loaded, under whichever of its exported spellings it has, or None:
    another BLAS, or no /proc to find it in."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps
                            if "openblas" in line.lower() and "/" in line})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""),
                               ("openblas", "64_"), ("openblas", "")):
            fn = getattr(lib, f"{prefix}_{name}{suffix}", None)
            if fn is not None:
                return fn
    return None


def _blas_threads_calls():
    """(get, set) of the thread count of the OpenBLAS NumPy loaded, or None."""
    get, put = _openblas_call("get_num_threads"), _openblas_call("set_num_threads")
    if get is None or put is None:
        return None
    get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
    return get, put


_blas_threads = _blas_threads_calls()


def blas_core():
    """The kernels NumPy's OpenBLAS runs, as it names them ("SkylakeX",
    "Haswell", ...), or None with another BLAS."""
    corename = _openblas_call("get_corename")
    if corename is None:
        return None
    corename.restype = ctypes.c_char_p
    return corename().decode()


class _OneBlasThread:
    """Within: OpenBLAS runs each GEMM on the calling thread only. Entered by
    the thread that hands out blocks, around all of them, and left once every
    block is done: so a GEMM in a block runs on one BLAS thread whatever
    ``threads()`` is, and its bits with it. The setting is process-wide, so
    callers on several threads share it: the first in sets it, the last out
    gives OpenBLAS its count back."""

    _lock, _users, _saved = threading.Lock(), 0, None

    def __enter__(self):
        if _blas_threads is None:
            return
        with _OneBlasThread._lock:
            if _OneBlasThread._users == 0:
                _OneBlasThread._saved = _blas_threads[0]()
                if _OneBlasThread._saved > 1:
                    _blas_threads[1](1)
            _OneBlasThread._users += 1

    def __exit__(self, *exc):
        if _blas_threads is None:
            return
        with _OneBlasThread._lock:
            _OneBlasThread._users -= 1
            if _OneBlasThread._users == 0 and _OneBlasThread._saved > 1:
                _blas_threads[1](_OneBlasThread._saved)


KEEP_AWAKE_ENV = "MINITORCH_GX_KEEP_AWAKE"


def keep_awake_enabled():
    """Whether ``cores_awake()`` starts keepers: MINITORCH_GX_KEEP_AWAKE unset or 1, not 0."""
    value = os.environ.get(KEEP_AWAKE_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{KEEP_AWAKE_ENV}={value!r}: use 1 (keep the cores awake) or 0")
    return value != "0"


class cores_awake:
    """``with cores_awake():`` keeps the NumPy path's cores from halting
    between its bursts of work (see the module docstring): ``threads()``
    keeper threads at SCHED_IDLE spin until the outermost ``with`` is left.
    Nothing is started with one thread, with MINITORCH_GX_KEEP_AWAKE=0, or
    without glibc's pthread_spin_lock; ``started`` says whether keepers run."""

    _lock, _users, _spin, _keepers = threading.Lock(), 0, None, []

    def __enter__(self):
        cls = cores_awake  # (one state for the class and any subclass)
        with cls._lock:
            count, calls = threads(), _spinlock_calls()
            if cls._users == 0 and keep_awake_enabled() and count > 1 and calls:
                init, lock, _ = calls
                spin = ctypes.c_int(0)  # a pthread_spinlock_t, held by this thread
                if init(ctypes.byref(spin), 0) == 0 and lock(ctypes.byref(spin)) == 0:
                    cls._spin = spin
                    cls._keepers = [threading.Thread(target=_keep_awake, args=(spin,),
                                                     name="minitorch_gx-awake", daemon=True)
                                    for _ in range(count)]
                    for t in cls._keepers:
                        t.start()
            cls._users += 1
            self.started = bool(cls._keepers)
        return self

    def __exit__(self, *exc):
        cls = cores_awake
        with cls._lock:
            # (a forked child leaving its parent's with finds 0: _forget_keepers_in_child)
            cls._users = max(0, cls._users - 1)
            if cls._users == 0 and cls._keepers:
                _spinlock_calls()[2](ctypes.byref(cls._spin))  # unlock: every keeper returns
                for t in cls._keepers:
                    t.join()
                cls._keepers, cls._spin = [], None


def _keep_awake(spin):
    """A keeper: at SCHED_IDLE, wait in pthread_spin_lock (ctypes drops the
    GIL) until the lock's holder lets go; never spin at a higher priority."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread only
    except (AttributeError, OSError):
        return
    _, lock, unlock = _spinlock_calls()
    lock(ctypes.byref(spin))
    unlock(ctypes.byref(spin))


@functools.cache
def _spinlock_calls():
    """(pthread_spin_init, pthread_spin_lock, pthread_spin_unlock) from the
    C library, or None where it has none (not glibc)."""
    try:
        libc = ctypes.CDLL(None)
        calls = tuple(getattr(libc, f"pthread_spin_{name}") for name in ("init", "lock", "unlock"))
    except (OSError, AttributeError, TypeError):
        return None
    for call in calls:
        call.restype = ctypes.c_int
    return calls


def _forget_keepers_in_child():
    # a forked child has none of the keeper threads (nor needs them)
    cores_awake._lock, cores_awake._users = threading.Lock(), 0
    cores_awake._spin, cores_awake._keepers = None, []


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_keepers_in_child)


def _in_pool(fn, start, stop):
    _inside.pool = True
    try:
        return fn(start, stop)
    finally:
        _inside.pool = False


_zero_rows = {}  # dtype -> the longest row of zeros asked for yet (read only)


def relu_into(a):
    """a = max(a, 0) in place, a NumPy array with a contiguous last axis.
    NumPy 2.4's maximum against a scalar 0 runs a loop several times slower
    than against an array (122 against 41 us for 1 MiB of float32 here), so
    the 0 is a kept row of zeros broadcast over a: the same values, bit for
    bit, NaN included."""
    length, dtype = a.shape[-1], numpy.dtype(a.dtype)
    zeros = _zero_rows.get(dtype)
    if zeros is None or zeros.size < length:
        zeros = _zero_rows[dtype] = numpy.zeros(length, dtype)
        zeros.flags.writeable = False
    return numpy.maximum(a, zeros[:length], out=a)


def relu_gradient_into(out, gy, y):
    """out = gy where y > 0, else gy * 0 (so -0 for a negative gy, NaN kept:
    the bits of ``gy * (y > 0)``), NumPy arrays of one float dtype; out may
    be y itself. The mask is written into out as 1.0 and 0.0 and multiplied
    there: a product with the bool array runs NumPy's casting loop (629
    against 400 us for 1M float32 here)."""
    numpy.greater(y, 0, out=out, casting="unsafe")
    return numpy.multiply(out, gy, out=out)


def flat_memory(*arrays):
    """1-D views of arrays of one shape and one memory layout (each a
    permutation of a C-contiguous array: NCHW, CNHW ...), in memory order;
    None when they differ or one has gaps. An element-wise pass over these
    is a pass over the arrays."""
    a = arrays[0]
    if any(b.shape != a.shape or b.strides != a.strides for b in arrays[1:]):
        return None
    order = sorted(range(a.ndim), key=lambda i: -a.strides[i])
    if not a.transpose(order).flags.c_contiguous:
        return None
    return [b.transpose(order).reshape(-1) for b in arrays]


# Element-wise passes go over each block in pieces of this many elements, so
# that a piece written by one ufunc is still in cache for the next (1 MiB
# per float32 array: the SGD update's four arrays stay in the L3 cache; with
# 64Ki-element pieces it took 26.5 ms instead of 22.0 for 25M parameters here,
# the extra ufunc calls costing more than the L2 saves).
PIECE_ELEMENTS = 1 << 18


def elementwise(passes, *flat):
    """Run ``passes(*pieces)`` over the 1-D arrays ``flat`` (``flat_memory``),
    piece by piece, the pieces split into fixed blocks over the threads."""
    n = flat[0].size

    def block(start, stop):
        for i in range(start, stop, PIECE_ELEMENTS):
            j = min(i + PIECE_ELEMENTS, stop)
            passes(*(a[i:j] for a in flat))

    run_blocks(block, n, min_rows=min_block_elements(), gemms=False)


def elementwise_new(passes, *arrays):
    """A new array ``out`` in the layout of ``arrays[0]``, filled by
    ``passes(*pieces_of_arrays, piece_of_out)`` (``elementwise``); None when
    the arrays are not all NumPy arrays of one dtype and one layout, for the
    caller's plain NumPy expression instead."""
    a = arrays[0]
    if not all(type(b) is numpy.ndarray and b.dtype == a.dtype for b in arrays):
        return None
    out = numpy.empty_like(a)
    flat = flat_memory(*arrays, out)
    if flat is None:
        return None
    elementwise(passes, *flat)
    return out
