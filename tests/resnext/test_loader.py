"""Loader: batch counts, shuffling and sharding, worker determinism, bad files, shutdown."""
import gc
import os
import signal
from multiprocessing import shared_memory

import numpy as np
import pytest

from resnext import transforms as T
from resnext.dataset import DataError, ImageFolder, shard
from resnext.demo_data import generate
from resnext.loader import IGNORE, Loader

SIZE = 24  # output image size: small keeps the tests fast


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """70 train and 30 val tiny JPEGs in 10 classes."""
    root = tmp_path_factory.mktemp("shapes") / "demo"
    generate(str(root), n_train=7, n_val=3, image_size=32)
    return ImageFolder(root / "train"), ImageFolder(root / "val")


def _epoch(loader):
    return [(x.copy(), y.copy()) for x, y in loader]


def test_train_batches_drop_last_and_labels_follow_the_order(shapes):
    train, _ = shapes
    loader = Loader(train, 16, train=True, image_size=SIZE, num_workers=0, seed=3)
    batches = _epoch(loader)
    assert len(loader) == len(batches) == 4  # 70 // 16: the partial batch is dropped
    for x, y in batches:
        assert x.shape == (16, SIZE, SIZE, 3) and x.dtype == np.uint8
        assert y.shape == (16,) and y.dtype == np.int64
    order = loader.epoch_indices()[:64]
    assert sorted(order) == sorted(set(order)) and len(order) == 64
    labels = np.concatenate([y for _, y in batches])
    assert np.array_equal(labels, [train.samples[i][1] for i in order])
    # Each image is the augmentation of its sample with the (seed, epoch, index) stream.
    i = int(order[5])
    expected = T.train_augment(train.samples[i][0], SIZE, np.random.default_rng((3, 0, i, 0)))
    assert np.array_equal(batches[0][0][5], expected)


def test_eval_keeps_the_last_partial_batch(shapes):
    _, val = shapes
    loader = Loader(val, 8, train=False, image_size=SIZE, num_workers=0)
    batches = _epoch(loader)
    assert len(loader) == 4 and [len(y) for _, y in batches] == [8, 8, 8, 6]
    assert np.array_equal(np.concatenate([y for _, y in batches]), [s[1] for s in val.samples])
    assert np.array_equal(batches[3][0][5], T.resize_center_crop(val.samples[-1][0], SIZE))


def test_reshuffles_every_epoch_and_repeats_for_the_same_seed(shapes):
    train, _ = shapes
    loader = Loader(train, 10, train=True, image_size=SIZE, num_workers=0, seed=0)
    first = loader.epoch_indices()
    loader.set_epoch(1)
    assert not np.array_equal(first, loader.epoch_indices())
    loader.set_epoch(0)
    assert np.array_equal(first, loader.epoch_indices())
    other_seed = Loader(train, 10, train=True, image_size=SIZE, num_workers=0, seed=1)
    assert not np.array_equal(first, other_seed.epoch_indices())


@pytest.mark.parametrize("train", [True, False])
def test_ranks_share_one_permutation_and_split_it(shapes, train):
    ds = shapes[0] if train else shapes[1]
    world = 3
    loaders = [Loader(ds, 4, train=train, image_size=SIZE, num_workers=0, seed=5,
                      rank=r, world_size=world) for r in range(world)]
    for loader in loaders:
        loader.set_epoch(2)
    shards = [loader.epoch_indices() for loader in loaders]
    if train:
        perm = np.random.default_rng((5, 2)).permutation(len(ds))
        assert all(np.array_equal(s, shard(perm, r, world)) for r, s in enumerate(shards))
        assert len({len(s) for s in shards}) == 1
        assert len(set(np.concatenate(shards))) == world * len(shards[0])
    else:  # every image scored exactly once over all ranks
        assert sorted(np.concatenate(shards)) == list(range(len(ds)))
        assert sum(loader.num_samples for loader in loaders) == len(ds)
        assert sum(len(y) for loader in loaders for _, y in loader) == len(ds)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_the_remaining_batches(shapes, workers):
    train, _ = shapes
    kw = dict(batch_size=8, train=True, image_size=SIZE, seed=4)
    full = Loader(train, num_workers=0, **kw)
    full.set_epoch(3)
    with Loader(train, num_workers=workers, **kw) as resumed:
        resumed.set_epoch(3, start_batch=5)
        tail = _epoch(resumed)
        assert len(resumed) == 8 and len(tail) == 3
    for (x0, y0), (x1, y1) in zip(_epoch(full)[5:], tail, strict=True):
        assert np.array_equal(x0, x1) and np.array_equal(y0, y1)
    with pytest.raises(ValueError, match="start_batch"):
        full.set_epoch(0, start_batch=9)


def test_workers_give_the_same_batches_as_in_process(shapes):
    train, _ = shapes
    kw = dict(batch_size=12, train=True, image_size=SIZE, seed=9)
    here = Loader(train, num_workers=0, **kw)
    here.set_epoch(1)
    with Loader(train, num_workers=2, prefetch=2, **kw) as pool:
        pool.set_epoch(1)
        ref, got = _epoch(here), _epoch(pool)
        assert len(got) == len(ref) == 5
        for (x0, y0), (x1, y1) in zip(ref, got):
            assert np.array_equal(x0, x1) and np.array_equal(y0, y1)
        # Per-sample streams: a different batch size gives the same image sequence.
        small = Loader(train, num_workers=0, **{**kw, "batch_size": 5})
        small.set_epoch(1)
        seq = np.concatenate([x for x, _ in _epoch(small)])[:60]
        assert np.array_equal(seq, np.concatenate([x for x, _ in got]))


def test_spawned_workers_need_no_inherited_state(shapes):
    _, val = shapes
    with Loader(val, 8, train=False, image_size=SIZE, num_workers=1, start_method="spawn") as spawned:
        got = _epoch(spawned)
    ref = _epoch(Loader(val, 8, train=False, image_size=SIZE, num_workers=0))
    for (x0, y0), (x1, y1) in zip(ref, got, strict=True):
        assert np.array_equal(x0, x1) and np.array_equal(y0, y1)


def test_a_superseded_iterator_stops(shapes):
    train, _ = shapes
    with Loader(train, 8, train=True, image_size=SIZE, num_workers=1) as loader:
        old = iter(loader)
        next(old)
        assert len(_epoch(loader)) == len(loader)
        with pytest.raises(RuntimeError, match="iterated again"):
            next(old)
        assert len(_epoch(loader)) == len(loader)  # the loader itself is unharmed


def _copy_of(dataset, root):
    """A writable copy of ``dataset``'s files under ``root``, as an ImageFolder."""
    for path, _ in dataset.samples:
        rel = os.path.relpath(path, dataset.root)
        os.makedirs(root / os.path.dirname(rel), exist_ok=True)
        with open(path, "rb") as f:
            (root / rel).write_bytes(f.read())
    return ImageFolder(root)


def test_corrupt_images_are_skipped_in_eval_and_counted(tmp_path, shapes):
    ds = _copy_of(shapes[1], tmp_path / "broken")
    truncated, garbage = ds.samples[4][0], ds.samples[12][0]
    with open(truncated, "r+b") as f:
        f.truncate(300)
    with open(garbage, "wb") as f:
        f.write(os.urandom(2000))

    for workers in (0, 2):
        loader = Loader(ds, 8, train=False, image_size=SIZE, num_workers=workers)
        batches = _epoch(loader)
        loader.close()
        assert list(loader.unreadable) == [truncated, garbage]
        images = np.concatenate([x for x, _ in batches])
        labels = np.concatenate([y for _, y in batches])
        assert len(images) == len(ds)  # one row per file, in order
        for bad in (4, 12):  # a blank row the evaluator leaves out
            assert labels[bad] == IGNORE and not images[bad].any()
        for good in (3, 5, 13):
            assert np.array_equal(images[good], T.resize_center_crop(ds.samples[good][0], SIZE))
            assert labels[good] == ds.samples[good][1]

    # A second epoch meets the same files: each is still recorded once.
    loader = Loader(ds, 8, train=False, image_size=SIZE, num_workers=0)
    _epoch(loader)
    _epoch(loader)
    assert list(loader.unreadable) == [truncated, garbage]


def test_corrupt_images_are_replaced_in_training_and_counted(tmp_path, shapes):
    ds = _copy_of(shapes[1], tmp_path / "broken")
    bad = {4, 12}
    for i in bad:
        with open(ds.samples[i][0], "wb") as f:
            f.write(os.urandom(500))
    loader = Loader(ds, 4, train=True, image_size=SIZE, num_workers=0, seed=3)
    kept = loader.epoch_indices()[:len(loader) * 4]          # what the epoch visits
    labels = np.concatenate([y for _, y in _epoch(loader)])
    assert bad & set(kept.tolist()), "the epoch must visit a corrupt file for this test to mean anything"
    assert set(loader.unreadable) == {ds.samples[i][0] for i in bad & set(kept.tolist())}
    for row, index in enumerate(kept):
        source = index + 1 if index in bad else index        # replaced by the next sample
        assert labels[row] == ds.samples[source][1]


def test_a_folder_of_unreadable_files_is_a_data_error(tmp_path):
    for k in range(3):
        (tmp_path / "c").mkdir(exist_ok=True)
        (tmp_path / "c" / f"{k}.JPEG").write_bytes(b"nope")
    loader = Loader(ImageFolder(tmp_path), 2, train=True, image_size=SIZE, num_workers=0)
    with pytest.raises(DataError, match="unreadable images in a row"):
        next(iter(loader))


def _gone(shm_name):
    try:
        shared_memory.SharedMemory(name=shm_name).close()
        return False
    except FileNotFoundError:
        return True


def test_stop_mid_epoch_then_continue_then_close(shapes):
    train, _ = shapes
    loader = Loader(train, 8, train=True, image_size=SIZE, num_workers=2, seed=1)
    for k, _ in enumerate(loader):
        if k == 1:
            break  # consumer stops early: tasks in flight are abandoned
    full = Loader(train, 8, train=True, image_size=SIZE, num_workers=0, seed=1)
    for (x0, y0), (x1, y1) in zip(_epoch(full), _epoch(loader)):
        assert np.array_equal(x0, x1) and np.array_equal(y0, y1)
    procs, name = list(loader._pool.procs), loader._pool.shm.name
    loader.close()
    assert all(p.exitcode is not None for p in procs) and _gone(name)


def test_interrupt_inside_the_loader_stops_workers(shapes):
    train, _ = shapes
    loader = Loader(train, 8, train=True, image_size=SIZE, num_workers=2)
    it = iter(loader)
    next(it)
    procs, name = list(loader._pool.procs), loader._pool.shm.name
    with pytest.raises(KeyboardInterrupt):
        it.throw(KeyboardInterrupt)  # as if Ctrl-C arrived while waiting for a batch
    assert all(p.exitcode is not None for p in procs) and _gone(name)
    assert len(_epoch(loader)) == len(loader)  # usable again: new workers start
    loader.close()


def test_dropping_the_loader_frees_everything(shapes):
    train, _ = shapes
    loader = Loader(train, 8, train=True, image_size=SIZE, num_workers=1)
    next(iter(loader))
    procs, name = list(loader._pool.procs), loader._pool.shm.name
    del loader
    gc.collect()
    assert all(p.exitcode is not None for p in procs) and _gone(name)


def test_a_dead_worker_is_reported_not_waited_for(shapes):
    train, _ = shapes
    loader = Loader(train, 4, train=True, image_size=SIZE, num_workers=1, prefetch=1)
    it = iter(loader)
    next(it)
    os.kill(loader._pool.procs[0].pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="worker .* exited"):
        for _ in it:
            pass
    loader.close()


def test_len_and_validation(shapes):
    train, val = shapes
    assert len(Loader(train, 16, train=True, image_size=SIZE, world_size=2, rank=1,
                      num_workers=0)) == 35 // 16
    assert len(Loader(val, 4, train=False, image_size=SIZE, world_size=4, rank=3,
                      num_workers=0)) == 2  # rank 3 of 4 gets 7 of 30 images
    with pytest.raises(ValueError, match="eval_resize"):
        Loader(val, 4, train=False, eval_resize="wide")
    with pytest.raises(ValueError, match="rank"):
        Loader(val, 4, train=False, rank=2, world_size=2)
