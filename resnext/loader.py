"""Batches of decoded, augmented images, produced by worker processes into shared memory.

    loader = Loader(ImageFolder("imagenet/train"), batch_size=128, train=True,
                    image_size=224, num_workers=8, seed=0, rank=r, world_size=n)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, labels in loader:   # uint8 (B, 224, 224, 3), int64 (B,)
            x = normalize(to_device(images), xp)

Order: every epoch the whole dataset is permuted with a generator seeded by
(seed, epoch) -- the same permutation on every rank -- and then sharded
(``dataset.shard``), so ranks see disjoint samples. Training drops the shard
remainder and the last partial batch; evaluation keeps both, so across ranks
every image is scored exactly once (shard sizes, hence ``len(loader)``, may then
differ by one between ranks: keep collectives out of the per-batch loop).
``set_epoch(e, start_batch=k)`` resumes epoch e at batch k.

Randomness: sample i of epoch e is augmented with a generator seeded by
(seed, e, i, attempt), so the output does not depend on the number of workers
or ranks.

Unreadable images: a file that fails to *decode* (``transforms.DECODE_ERRORS``)
is recorded in ``loader.unreadable``, a dict path -> reason holding each file
once, in the order first met; an epoch never stops for one bad file. In training it is replaced by the next sample of
the dataset (i+1, i+2, ...). In evaluation its row is a blank image labelled
``IGNORE`` (-1), so that no image is scored twice: the evaluator drops those
rows. Any other exception while preparing a sample (e.g. a crop size of 0) is
a bug, not a bad file: it propagates (from a worker, as a RuntimeError whose
first line names the exception and the file).

Workers: ``num_workers`` processes split every batch into chunks and write
pixels straight into a ring of batch buffers in shared memory, so image data
is never pickled; only task and result notes travel through queues.
``num_workers=0`` does the same work in this process.
"""
import logging
import math
import multiprocessing as mp
import os
import queue
import signal
import traceback
import weakref
from multiprocessing import shared_memory

import numpy as np

from . import transforms
from .dataset import DataError, shard, shard_size

log = logging.getLogger(__name__)

MAX_REPLACEMENTS = 50  # consecutive unreadable files before we conclude the data is broken
IGNORE = -1  # the label of an unreadable image's row in evaluation
_POLL_S = 1.0  # how often blocked processes check that their peers are still alive


# ---------------------------------------------------------------------------
# Producing one sample / one chunk of a batch (runs in workers or in-process)
# ---------------------------------------------------------------------------
class _Recipe:
    """What a worker needs to produce samples; pickled once per worker."""

    def __init__(self, samples, train, image_size, seed, eval_resize, crop_scale=(0.08, 1.0)):
        self.samples = samples
        self.crop_scale = crop_scale
        self.train = train
        self.image_size = image_size
        self.seed = seed
        self.eval_resize = eval_resize


def load_sample(recipe, index, epoch):
    """Image and label for dataset sample ``index`` in ``epoch``:
    (uint8 (S, S, 3), int, [(path, reason) of the unreadable files met]).

    Training: an unreadable file is replaced by the next sample of the dataset,
    with a fresh random stream (seeded by the attempt number too). Evaluation:
    a blank image labelled IGNORE. Only decoding failures count as unreadable;
    any other exception propagates.
    """
    bad = []
    n = len(recipe.samples)
    if not recipe.train:  # evaluation: score every readable image once, skip the rest
        path, label = recipe.samples[index]
        try:
            return (transforms.resize_center_crop(path, recipe.image_size, mode=recipe.eval_resize),
                    label, bad)
        except transforms.DECODE_ERRORS as e:
            size = recipe.image_size
            return np.zeros((size, size, 3), np.uint8), IGNORE, [(path, e.reason)]
    for attempt in range(MAX_REPLACEMENTS):
        path, label = recipe.samples[(index + attempt) % n]
        try:
            rng = np.random.default_rng((recipe.seed, epoch, index, attempt))
            image = transforms.train_augment(path, recipe.image_size, rng, scale=recipe.crop_scale)
            return image, label, bad
        except transforms.DECODE_ERRORS as e:
            bad.append((path, e.reason))
    raise DataError(f"{MAX_REPLACEMENTS} unreadable images in a row, starting at "
                    f"{recipe.samples[index][0]}: is the dataset damaged? (the last one, "
                    f"{bad[-1][0]}: {bad[-1][1]})")


def fill_rows(recipe, epoch, indices, images, labels):
    """Write samples ``indices`` into rows of ``images`` (K, S, S, 3) and ``labels`` (K,).
    Returns [(path, reason)] of the unreadable files met, in sample order.

    An exception that is not a decoding failure propagates, with a note (on
    Python >= 3.11) naming the sample it was raised for."""
    bad = []
    for row, index in enumerate(indices):
        try:
            images[row], labels[row], skipped = load_sample(recipe, int(index), epoch)
        except DataError:
            raise
        except Exception as e:
            if hasattr(e, "add_note"):
                e.add_note(f"while preparing {recipe.samples[int(index)][0]} "
                           f"(sample {int(index)}, epoch {epoch})")
            raise
        bad.extend(skipped)
    return bad


# ---------------------------------------------------------------------------
# Worker processes and the shared-memory ring
# ---------------------------------------------------------------------------
def _ring_views(buf, num_slots, batch_size, image_size):
    """numpy views of the ring: images (R, B, S, S, 3) uint8, then labels (R, B) int64."""
    images = np.ndarray((num_slots, batch_size, image_size, image_size, 3), np.uint8, buf)
    labels = np.ndarray((num_slots, batch_size), np.int64, buf, offset=images.nbytes)
    return images, labels


def _ring_bytes(num_slots, batch_size, image_size):
    return num_slots * batch_size * (image_size * image_size * 3 + 8)


def _worker_main(shm_name, ring_shape, recipe, tasks, results, live_generation):
    """Loop of one worker: take a chunk task, fill its rows of the ring, report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    shm = shared_memory.SharedMemory(name=shm_name)
    images, labels = _ring_views(shm.buf, *ring_shape)
    parent = mp.parent_process()
    try:
        while True:
            try:
                task = tasks.get(timeout=_POLL_S)
            except queue.Empty:
                if parent is not None and not parent.is_alive():
                    return  # orphaned: the main process died without closing us
                continue
            if task is None:
                return
            generation, batch, slot, row, epoch, indices = task
            if generation != live_generation.value:
                results.put((generation, batch, row, [], None))  # abandoned epoch
                continue
            try:
                rows = slice(row, row + len(indices))
                bad = fill_rows(recipe, epoch, indices, images[slot, rows], labels[slot, rows])
                results.put((generation, batch, row, bad, None))
            except DataError as e:  # the data's fault: one line for the user
                results.put((generation, batch, row, [], ("data", str(e))))
            except Exception as e:  # a bug: hand it and its traceback to the main process
                where = "; ".join(getattr(e, "__notes__", None) or [])
                summary = f"{type(e).__name__}: {e}" + (f" ({where})" if where else "")
                results.put((generation, batch, row, [],
                             ("bug", f"{summary}\n{traceback.format_exc()}")))
    finally:
        del images, labels
        shm.close()


class _WorkerPool:
    """Worker processes, their queues and the shared ring of ``num_slots`` batch buffers."""

    def __init__(self, recipe, num_workers, num_slots, batch_size, start_method):
        image_size = recipe.image_size
        need = _ring_bytes(num_slots, batch_size, image_size)
        _check_shm_space(need)
        ctx = mp.get_context(start_method)
        self.shm = shared_memory.SharedMemory(create=True, size=need)
        self.images, self.labels = _ring_views(self.shm.buf, num_slots, batch_size, image_size)
        self.tasks = ctx.Queue()
        self.results = ctx.Queue()
        self.live_generation = ctx.Value("q", 0, lock=False)
        self.outstanding = 0  # chunk tasks sent whose result has not been received
        self.procs = []
        ring_shape = (num_slots, batch_size, image_size)
        try:
            for _ in range(num_workers):
                p = ctx.Process(target=_worker_main, daemon=True,
                                args=(self.shm.name, ring_shape, recipe, self.tasks,
                                      self.results, self.live_generation))
                p.start()
                self.procs.append(p)
        except BaseException:
            self.close()
            raise

    def submit(self, generation, batch, slot, row, epoch, indices):
        self.tasks.put((generation, batch, slot, row, epoch, indices))
        self.outstanding += 1

    def receive(self, timeout=None):
        """Next result note; raises if a worker died. None after ``timeout`` seconds."""
        waited = 0.0
        while True:
            try:
                note = self.results.get(timeout=_POLL_S)
                self.outstanding -= 1
                return note
            except queue.Empty:
                dead = [p for p in self.procs if p.exitcode is not None]
                if dead:
                    raise RuntimeError(f"data loader worker (pid {dead[0].pid}) exited with code "
                                       f"{dead[0].exitcode}; check memory (dmesg) and the log")
                waited += _POLL_S
                if timeout is not None and waited >= timeout:
                    return None

    def drain(self, timeout=120.0):
        """Wait for every task in flight (tasks of an abandoned epoch are skipped fast)."""
        while self.outstanding > 0:
            if self.receive(timeout) is None:
                raise RuntimeError(f"data loader workers did not finish within {timeout:.0f} s")

    def close(self):
        for _ in self.procs:
            try:
                self.tasks.put_nowait(None)
            except (ValueError, OSError):
                break
        for p in self.procs:
            p.join(timeout=5)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        self.procs = []
        for q in (self.tasks, self.results):
            q.close()
            q.cancel_join_thread()  # do not block exit on notes nobody will read
        self.images = self.labels = None
        if self.shm is not None:
            try:
                self.shm.close()
            except BufferError:
                pass  # a batch view (copy=False) is still held; unmapped when it dies
            self.shm.unlink()
            self.shm = None


def _check_shm_space(need):
    """Fail early with advice: writing past a full /dev/shm kills a worker with SIGBUS."""
    if not os.path.isdir("/dev/shm"):
        return
    st = os.statvfs("/dev/shm")
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise RuntimeError(f"/dev/shm has {free / 2**20:.0f} MiB free but the loader needs "
                           f"{need / 2**20:.0f} MiB: lower batch size or prefetch, or enlarge it "
                           f"(docker run --shm-size)")


# ---------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------
class _Superseded(RuntimeError):
    """An iterator of a loader that has since been iterated again."""


def default_num_workers(world_size=1):
    """CPUs this process may use, shared among the ranks of one machine, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, (cpus or 1) // max(1, world_size)))


class Loader:
    """Iterate ``(images uint8 (B, S, S, 3), labels int64 (B,))`` over this rank's shard.

    dataset:     an ``ImageFolder`` (or anything with ``.samples`` = [(path, label)]).
    train:       random crop/flip/jitter, drop partial batches; else the eval transform.
    num_workers: worker processes; 0 decodes in this process. Default: see
                 ``default_num_workers``.
    eval_resize: "square" (the original code) or "shorter" (torchvision).
    crop_scale:  the area fraction range of the training random resized crop.
    prefetch:    batches prepared ahead of the consumer (each one buffer of
                 B*S*S*3 bytes in /dev/shm).
    copy:        True yields batches you may keep; False yields views into the
                 ring, valid only until the next batch is requested (saves a memcpy).
    warn_unreadable: log a warning on the ``resnext.loader`` logger (stderr
                 when logging is not configured) the first time each unreadable
                 file is met. Pass False when the caller reports ``unreadable``
                 in its own log.
    start_method: multiprocessing start method. Default "fork" where it exists:
                 "spawn" and "forkserver" re-import the main script in every
                 worker, re-running its top-level code (e.g. mpi4py's MPI_Init).
                 Forked workers touch only NumPy and Pillow, never CUDA or MPI,
                 so forking a process that holds those is safe. The workers get
                 everything as arguments, so "spawn" works too (main guard needed).
    """

    def __init__(self, dataset, batch_size, train, image_size=224, num_workers=None, seed=0,
                 rank=0, world_size=1, eval_resize="square", prefetch=2, copy=True,
                 start_method=None, crop_scale=(0.08, 1.0), warn_unreadable=True):
        samples = list(getattr(dataset, "samples", dataset))
        if not samples:
            raise DataError("the loader got an empty dataset")
        if batch_size < 1 or prefetch < 1:
            raise ValueError(f"batch_size and prefetch must be >= 1, got {batch_size}, {prefetch}")
        if eval_resize not in ("square", "shorter"):
            raise ValueError(f"eval_resize must be 'square' or 'shorter', got {eval_resize!r}")
        shard(samples, rank, world_size)  # validates rank / world_size
        self.recipe = _Recipe(samples, bool(train), int(image_size), int(seed), eval_resize,
                              tuple(crop_scale))
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.rank, self.world_size = rank, world_size
        self.num_workers = default_num_workers(world_size) if num_workers is None else int(num_workers)
        self.prefetch = int(prefetch)
        self.copy = copy
        if start_method is None:
            start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        self.start_method = start_method
        self.epoch = 0
        self.start_batch = 0
        self.warn_unreadable = bool(warn_unreadable)
        # path -> reason of every unreadable file met (this loader, all epochs so
        # far), each once, in the order first met (on this rank: its own shard).
        self.unreadable = {}
        self._pool = None
        self._finalizer = None
        self._generation = 0

    # -- order -------------------------------------------------------------
    def set_epoch(self, epoch, start_batch=0):
        """Select the epoch whose shuffle and augmentation the next iterations use.

        start_batch: skip that many batches of the epoch (without decoding them),
        to resume mid-epoch; the batches that follow are exactly those an
        uninterrupted epoch would give. ``len(loader)`` still counts the whole epoch.
        """
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def epoch_indices(self, epoch=None):
        """Dataset indices this rank visits in ``epoch``, in order (before batching)."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.recipe.samples)
        if not self.train:
            return shard(np.arange(n), self.rank, self.world_size, drop_remainder=False)
        order = np.random.default_rng((self.recipe.seed, epoch)).permutation(n)
        return shard(order, self.rank, self.world_size, drop_remainder=True)

    def _batches(self):
        """Index arrays of the batches the next iteration yields."""
        indices, B = self.epoch_indices(), self.batch_size
        return [indices[k * B:(k + 1) * B] for k in range(self.start_batch, len(self))]

    def __len__(self):
        n = shard_size(len(self.recipe.samples), self.rank, self.world_size, self.train)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    @property
    def num_samples(self):
        """Images yielded per epoch on this rank."""
        n = shard_size(len(self.recipe.samples), self.rank, self.world_size, self.train)
        return len(self) * self.batch_size if self.train else n

    def _count_bad(self, bad):
        for path, reason in bad:
            if path not in self.unreadable:
                self.unreadable[path] = reason
                if self.warn_unreadable:
                    log.warning("unreadable image %s (%s): %s", path, reason,
                                "replaced by the next sample" if self.train else "not scored")

    # -- iteration ---------------------------------------------------------
    def __iter__(self):
        self._generation += 1  # an older iterator of this loader stops being valid
        if self.num_workers == 0:
            return self._iter_here(self._generation)
        return self._iter_workers(self._generation)

    def _check_current(self, generation):
        if generation != self._generation:
            raise _Superseded("this loader was iterated again; an older iterator cannot continue")

    def _iter_here(self, generation):
        S = self.recipe.image_size
        for indices in self._batches():
            self._check_current(generation)
            images = np.empty((len(indices), S, S, 3), np.uint8)
            labels = np.empty(len(indices), np.int64)
            self._count_bad(fill_rows(self.recipe, self.epoch, indices, images, labels))
            yield images, labels

    def _iter_workers(self, generation):
        pool = self._start_pool()
        pool.drain()  # tasks of an abandoned iteration must not write into reused slots
        pool.live_generation.value = generation
        batches = self._batches()
        num_slots = len(pool.images)
        chunk = math.ceil(self.batch_size / self.num_workers)
        pending = {}  # batch -> chunks not yet done
        bad_paths = {}  # batch -> {first row of a chunk: unreadable files it replaced}

        def submit(b):
            slot = b % num_slots
            pending[b], bad_paths[b] = 0, {}
            for row in range(0, len(batches[b]), chunk):
                pool.submit(generation, b, slot, row, self.epoch, batches[b][row:row + chunk])
                pending[b] += 1

        try:
            for b in range(min(num_slots - (0 if self.copy else 1), len(batches))):
                submit(b)
            for b in range(len(batches)):
                while pending[b] > 0:
                    self._check_current(generation)
                    gen, done_batch, row, bad, error = pool.receive()
                    if gen != generation:
                        continue
                    if error is not None:
                        kind, text = error
                        if kind == "data":
                            raise DataError(text)
                        # first line: the exception and the file; then the worker's traceback
                        raise RuntimeError(f"data loader worker failed (a bug, not a bad "
                                           f"image): {text}")
                    pending[done_batch] -= 1
                    bad_paths[done_batch][row] = bad
                del pending[b]
                for row in sorted(bad_paths[b]):  # in sample order, whatever order chunks finished in
                    self._count_bad(bad_paths[b][row])
                del bad_paths[b]
                slot, n = b % num_slots, len(batches[b])
                images, labels = pool.images[slot, :n], pool.labels[slot, :n]
                if self.copy:
                    images, labels = images.copy(), labels.copy()
                    if b + num_slots < len(batches):
                        submit(b + num_slots)  # the slot is free again
                    yield images, labels
                    self._check_current(generation)
                else:
                    yield images, labels
                    self._check_current(generation)
                    if b + num_slots - 1 < len(batches):  # the consumer is done with slot b
                        submit(b + num_slots - 1)
        except _Superseded:
            raise
        except GeneratorExit:
            # The consumer stopped early: let the workers skip what is left.
            if generation == self._generation:
                pool.live_generation.value = -1
            raise
        except BaseException:
            # Ctrl-C or a failure: stop the workers; the next iteration starts new ones.
            if generation == self._generation:
                self.close()
            raise

    def _start_pool(self):
        if self._pool is None:
            # copy=False keeps one more slot: the one the consumer is still reading.
            num_slots = self.prefetch + (0 if self.copy else 1)
            self._pool = _WorkerPool(self.recipe, self.num_workers, num_slots,
                                     self.batch_size, self.start_method)
            # Close the pool when the loader is collected or at interpreter exit;
            # the callback must not hold the loader itself.
            self._finalizer = weakref.finalize(self, self._pool.close)
        return self._pool

    def close(self):
        """Stop the workers and free the shared memory (also done automatically)."""
        if self._finalizer is not None:
            self._finalizer()
        self._pool = self._finalizer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
