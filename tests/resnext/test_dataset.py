"""ImageFolder indexing and errors, rank sharding, and the generated demo dataset."""
import os

import numpy as np
import pytest
from PIL import Image

from resnext import demo_data
from resnext.dataset import DataError, ImageFolder, shard, shard_size


def _touch_image(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(path, format="PNG")


def test_classes_sorted_and_labels_are_positions(tmp_path):
    for cls, files in {"n02": ["b.JPEG", "a.jpg"], "n01": ["x.PNG", "y.bmp", "z.webp"],
                       "n10": ["sub/deep.jpeg"]}.items():
        for f in files:
            _touch_image(tmp_path / cls / f)
    (tmp_path / "n01" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    _touch_image(tmp_path / "stray.JPEG")  # a file beside the class folders is no class

    ds = ImageFolder(tmp_path)
    assert ds.classes == ["n01", "n02", "n10"]
    assert ds.class_to_idx == {"n01": 0, "n02": 1, "n10": 2}
    rel = [(os.path.relpath(p, tmp_path), label) for p, label in ds.samples]
    assert rel == [("n01/x.PNG", 0), ("n01/y.bmp", 0), ("n01/z.webp", 0),
                   ("n02/a.jpg", 1), ("n02/b.JPEG", 1), ("n10/sub/deep.jpeg", 2)]
    assert len(ds) == 6


def test_given_class_list_keeps_indices(tmp_path):
    _touch_image(tmp_path / "val" / "c" / "1.JPEG")
    ds = ImageFolder(tmp_path / "val", classes=["a", "b", "c"])
    assert ds.samples[0][1] == 2
    with pytest.raises(DataError, match="not in the given class list"):
        ImageFolder(tmp_path / "val", classes=["a", "b"])


@pytest.mark.parametrize("case", ["missing", "no_classes", "no_images"])
def test_unusable_folders_give_one_line_naming_the_path(tmp_path, case):
    root = tmp_path / "imagenet" / "train"
    if case != "missing":
        root.mkdir(parents=True)
    if case == "no_images":
        (root / "n01").mkdir()
        (root / "n01" / "readme.txt").write_text("x")
    with pytest.raises(DataError) as err:
        ImageFolder(root)
    message = str(err.value)
    assert str(root) in message and "\n" not in message
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("n,world_size", [(10, 1), (10, 3), (12, 4), (5, 8), (101, 7)])
def test_shards_are_disjoint_equal_or_covering(n, world_size):
    items = list(np.random.default_rng(n).permutation(n))
    # Training: equal sizes, disjoint, only the remainder missing.
    train = [shard(items, r, world_size) for r in range(world_size)]
    assert all(len(s) == n // world_size for s in train)
    flat = [x for s in train for x in s]
    assert len(set(flat)) == len(flat) == n - n % world_size
    assert all(shard_size(n, r, world_size) == len(train[r]) for r in range(world_size))
    # Evaluation: every item exactly once, sizes within one of each other.
    evals = [shard(items, r, world_size, drop_remainder=False) for r in range(world_size)]
    assert sorted(x for s in evals for x in s) == sorted(items)
    assert max(map(len, evals)) - min(map(len, evals)) <= 1
    assert all(shard_size(n, r, world_size, False) == len(evals[r]) for r in range(world_size))


def test_shard_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        shard([1, 2, 3], 2, 2)


# ---------------------------------------------------------------------------
# demo dataset
# ---------------------------------------------------------------------------
def test_demo_dataset_layout_and_determinism(tmp_path):
    root = demo_data.ensure_demo_dataset(tmp_path / "a", n_train=3, n_val=1, image_size=32, seed=5)
    other = demo_data.ensure_demo_dataset(tmp_path / "b", n_train=3, n_val=1, image_size=32, seed=5)
    train, val = ImageFolder(os.path.join(root, "train")), ImageFolder(os.path.join(root, "val"))
    assert train.classes == sorted(demo_data.CLASSES) == val.classes
    assert len(train) == 30 and len(val) == 10
    with Image.open(train.samples[0][0]) as img:
        assert img.format == "JPEG" and img.size == (32, 32) and img.mode == "RGB"
    for path, _ in train.samples + val.samples:  # same seed, same bytes
        rel = os.path.relpath(path, root)
        with open(path, "rb") as f, open(os.path.join(other, rel), "rb") as g:
            assert f.read() == g.read()
    lines = open(os.path.join(root, "train_list.txt")).read().splitlines()
    assert lines[3] == f"{train.classes[1]}/{train.classes[1]}_0000.JPEG 1"
    assert [(os.path.join(root, "train", line.split()[0]), int(line.split()[1]))
            for line in lines] == train.samples
    # Images differ from one another (random colour, position, ...).
    pixels = [np.asarray(Image.open(p)) for p, _ in train.samples[:3]]
    assert not np.array_equal(pixels[0], pixels[1])


def test_demo_dataset_cache_env_and_reuse(tmp_path, monkeypatch):
    monkeypatch.setenv("MINITORCH_GX_CACHE", str(tmp_path / "cache"))
    path = demo_data.ensure_demo_dataset(n_train=1, n_val=1, image_size=16)
    assert path == str(tmp_path / "cache" / demo_data.NAME)
    stamp = os.path.getmtime(os.path.join(path, "train_list.txt"))
    assert demo_data.ensure_demo_dataset() == path  # second call: no regeneration
    assert os.path.getmtime(os.path.join(path, "train_list.txt")) == stamp


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    real_write = demo_data._write_split

    def write_then_die(folder, split, *args):
        real_write(folder, split, *args)
        if split == "val":
            raise KeyboardInterrupt

    monkeypatch.setattr(demo_data, "_write_split", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        demo_data.ensure_demo_dataset(tmp_path / "demo", n_train=1, n_val=1, image_size=16)
    assert os.listdir(tmp_path) == []


def test_demo_root_that_is_something_else_is_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    with pytest.raises(DataError, match="not a generated demo dataset"):
        demo_data.ensure_demo_dataset(tmp_path / "mine")
