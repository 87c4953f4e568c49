"""Unreadable images: only a failure to decode a file counts as one (a bug in
the transforms surfaces as a bug); the loader keeps each unreadable file once
with its reason; eval.py names each in its log once, and a folder where no
image can be read is one clear line."""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from resnext import transforms as T
from resnext.dataset import DataError, ImageFolder
from resnext.evaluate import main as eval_main
from resnext.loader import IGNORE, Loader

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = 16


@pytest.fixture
def broken(data, tmp_path):
    """A copy of the tiny val set (12 images) with one truncated and one garbage file."""
    root = tmp_path / "val"
    shutil.copytree(data / "val", root)
    truncated = root / "n001" / "img_2.JPEG"
    truncated.write_bytes(truncated.read_bytes()[:200])
    garbage = root / "n003" / "img_0.JPEG"
    garbage.write_bytes(b"this is not an image")
    return root, str(truncated), str(garbage)


def _epoch(loader):
    return [(x.copy(), y.copy()) for x, y in loader]


# -- case 13: only decoding failures are unreadable images -------------------------------------
def test_transform_bugs_are_not_decode_errors(data):
    good = str(next(iter(ImageFolder(data / "val").samples))[0])
    for bug in (lambda: T.resize_center_crop(good, 0),
                lambda: T.train_augment(good, 0, np.random.default_rng(0)),
                lambda: T.train_augment(good, SIZE, np.random.default_rng(0), scale=(2.0, 1.0))):
        with pytest.raises(ValueError) as err:
            bug()
        assert not isinstance(err.value, T.DECODE_ERRORS), err.value


def test_decode_errors_keep_their_reason(broken, monkeypatch):
    root, truncated, garbage = broken
    with pytest.raises(T.DECODE_ERRORS) as err:
        T.resize_center_crop(garbage, SIZE)
    assert err.value.path == garbage and "UnidentifiedImageError" in err.value.reason
    assert garbage not in err.value.reason and "''" not in err.value.reason   # named once
    with pytest.raises(T.DECODE_ERRORS) as err:
        T.train_augment(truncated, SIZE, np.random.default_rng(0))
    assert err.value.path == truncated and "OSError" in err.value.reason
    assert "truncated" in err.value.reason.lower()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)    # every image is now a "bomb"
    good = str(root / "n002" / "img_0.JPEG")
    with pytest.raises(T.DECODE_ERRORS) as err:
        T.resize_center_crop(good, SIZE)
    assert "DecompressionBombError" in err.value.reason


@pytest.mark.parametrize("train", [True, False])
def test_a_bad_image_size_is_a_bug_not_a_damaged_dataset_in_process(data, train):
    loader = Loader(ImageFolder(data / "val"), 4, train=train, image_size=0, num_workers=0)
    with pytest.raises(ValueError, match="height and width must be > 0") as err:
        next(iter(loader))
    assert not isinstance(err.value, DataError)            # was "50 unreadable images in a row"
    assert loader.unreadable == {}


def test_a_bad_crop_scale_is_a_bug_not_a_damaged_dataset_in_process(data):
    loader = Loader(ImageFolder(data / "train"), 4, train=True, image_size=SIZE, num_workers=0,
                    crop_scale=(2.0, 1.0))
    with pytest.raises(ValueError, match="high - low < 0") as err:
        next(iter(loader))
    assert not isinstance(err.value, DataError)


@pytest.mark.parametrize("train", [True, False])
def test_a_bug_in_a_worker_reaches_the_main_process_named(data, train):
    loader = Loader(ImageFolder(data / "val"), 4, train=train, image_size=0, num_workers=1)
    try:
        with pytest.raises(RuntimeError) as err:
            next(iter(loader))
    finally:
        loader.close()
    first = str(err.value).splitlines()[0]
    assert "ValueError: height and width must be > 0" in first, first
    assert re.search(r"while preparing \S+/n00\d/img_\d\.JPEG", first), first   # the file
    assert "unreadable" not in first
    assert not isinstance(err.value, DataError)


# -- case 16: distinct unreadable files, with reasons -----------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_keeps_each_unreadable_file_once_with_its_reason(broken, workers):
    root, truncated, garbage = broken
    loader = Loader(ImageFolder(root), 5, train=False, image_size=SIZE, num_workers=workers)
    try:
        for _ in range(3):
            labels = np.concatenate([y for _, y in _epoch(loader)])
    finally:
        loader.close()
    assert list(loader.unreadable) == [truncated, garbage]   # insertion order: sample order
    assert "truncated" in loader.unreadable[truncated].lower()
    assert "UnidentifiedImageError" in loader.unreadable[garbage]
    assert (labels == IGNORE).sum() == 2


def test_training_counts_distinct_files_over_epochs(broken):
    root, truncated, garbage = broken
    loader = Loader(ImageFolder(root), 4, train=True, image_size=SIZE, num_workers=0, seed=0)
    for epoch in range(3):
        loader.set_epoch(epoch)
        _epoch(loader)
    assert set(loader.unreadable) <= {truncated, garbage} and loader.unreadable


def test_a_damaged_dataset_names_the_reason(tmp_path):
    (tmp_path / "c").mkdir()
    for k in range(3):
        (tmp_path / "c" / f"{k}.JPEG").write_bytes(b"nope")
    loader = Loader(ImageFolder(tmp_path), 2, train=True, image_size=SIZE, num_workers=0)
    with pytest.raises(DataError, match=r"unreadable images in a row.*UnidentifiedImageError"):
        next(iter(loader))


# -- eval.py: each unreadable file named once, with its reason; none readable: one line -------
def _checkpoint(folder, epochs):
    from tests.resnext.test_eval_trust import write_checkpoint
    folder.mkdir()
    return [write_checkpoint(folder / f"0-{e}_1.ckpt") for e in epochs]


def test_eval_names_each_unreadable_file_once_with_its_reason(broken, tmp_path, capsys):
    root, truncated, garbage = broken
    _checkpoint(tmp_path / "ckpt_0", (1, 2))                 # two checkpoints, two loaders
    capsys.readouterr()
    assert eval_main(["--data_path", str(root), "--checkpoint_file_path", str(tmp_path / "ckpt_0"),
                      "--num_workers", "0", "--device_target", "CPU"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert len(re.findall(r"tot=10, acc=", out)) == 4        # 12 files, 10 readable, 2 checkpoints
    for path, reason in ((truncated, "truncated"), (garbage, "UnidentifiedImageError")):
        named = [line for line in out.splitlines() if path in line]
        assert len(named) == 1, out                          # once, not once per checkpoint
        assert re.search(r"WARNING:unreadable image .*not scored", named[0])
        assert reason.lower() in named[0].lower()
    assert out.count("2 unreadable image(s) skipped") == 2
    assert truncated not in captured.err and garbage not in captured.err   # in the log, not stderr


def test_eval_of_a_folder_with_no_readable_image_is_one_line(data, tmp_path):
    root = tmp_path / "val"
    shutil.copytree(data / "val", root)
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "wb") as fh:
                fh.write(b"garbage")
    _checkpoint(tmp_path / "ckpt_0", (1,))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--data_path", str(root),
                        "--checkpoint_file_path", str(tmp_path / "ckpt_0"), "--num_workers", "0",
                        "--device_target", "CPU"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr                         # was a ZeroDivisionError traceback
    assert lines[0].startswith(f"error: no image in {root} could be read: all 12 files are "
                               f"unreadable, e.g. {root / 'n001' / 'img_0.JPEG'} ("), lines


# -- train.py: each unreadable file named once in the run log; the count is of files ------------
def test_the_run_log_names_each_unreadable_file_once_and_counts_files(broken, tmp_path):
    import json

    from resnext import trainer
    from tests.resnext.test_train_eval import TINY, only_run
    root, truncated, garbage = broken
    out = tmp_path / "out"
    assert trainer.main(["--data_path", str(root), "--output_path", str(out), "--max_epoch", "3",
                         "--ckpt_interval", "3"] + TINY) == 0
    run = only_run(out)
    log = pathlib.Path(run, next(f for f in os.listdir(run) if f.endswith(".log"))).read_text()
    for path in (truncated, garbage):
        assert len(re.findall(re.escape(f"unreadable image {path} ("), log)) == 1, log
    metrics = pathlib.Path(run, "ckpt_0", "metrics.jsonl").read_text()
    records = [json.loads(x) for x in metrics.splitlines()]
    assert [r["corrupt_images"] for r in records] == [2, 2, 2]  # files, not attempts
