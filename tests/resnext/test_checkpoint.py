"""Checkpoints: exact round trip, atomic writes, no pickle, naming and pruning."""
import os
import pathlib

import numpy
import pytest

from minitorch_gx import nn
from minitorch_gx.optim import SGD
from resnext import checkpoint as ckpt


def small_model(seed):
    rng = numpy.random.default_rng(seed)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))
    for p in m.parameters():
        p.data[...] = rng.standard_normal(p.shape)
    m[1].running_mean[...] = rng.standard_normal(4)
    return m


def test_round_trip_is_exact(tmp_path):
    m = small_model(0)
    opt = SGD(m.parameters(), lr=0.1, momentum=0.9)
    opt.flat_momentum[...] = numpy.arange(opt.flat_momentum.size)
    path = ckpt.save_checkpoint(str(tmp_path / "0-1_5.ckpt"), m, opt, {"epoch_index": 0})
    state, optim_state, meta = ckpt.load_checkpoint(path)
    for k, v in m.state_dict().items():
        assert state[k].dtype == v.dtype and numpy.array_equal(state[k], v), k
    assert meta["epoch_index"] == 0
    m2 = small_model(1)
    opt2 = SGD(m2.parameters(), lr=0.5, momentum=0.9)
    m2.load_state_dict(state)
    opt2.load_state_dict(optim_state)
    assert numpy.array_equal(opt2.flat_momentum, opt.flat_momentum)
    assert opt2.param_groups[0]["lr"] == 0.1


def test_a_crash_while_writing_leaves_the_old_file_intact(tmp_path, monkeypatch):
    m = small_model(0)
    path = str(tmp_path / "0-1_5.ckpt")
    ckpt.save_checkpoint(path, m)
    before = pathlib.Path(path).read_bytes()

    def crash(f, **arrays):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(numpy, "savez", crash)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(path, small_model(1))
    assert pathlib.Path(path).read_bytes() == before
    assert os.listdir(tmp_path) == ["0-1_5.ckpt"]          # no temporary left behind


def test_loading_never_unpickles(tmp_path):
    bad = tmp_path / "0-1_1.ckpt"
    with open(bad, "wb") as f:
        numpy.savez(f, meta=numpy.frombuffer(b"{}", numpy.uint8),
                    evil=numpy.array([object()], dtype=object))
    with pytest.raises(ckpt.CheckpointError, match="cannot read checkpoint"):
        ckpt.load_checkpoint(str(bad))


def test_corrupt_and_missing_files_are_clear_errors(tmp_path):
    garbage = tmp_path / "0-1_1.ckpt"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(ckpt.CheckpointError, match="cannot read checkpoint"):
        ckpt.load_checkpoint(str(garbage))
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.load_checkpoint(str(tmp_path / "missing.ckpt"))


def test_names_listing_and_pruning(tmp_path):
    m = small_model(0)
    for epoch in (5, 10, 15, 20, 25, 30):
        ckpt.save_checkpoint(str(tmp_path / ckpt.checkpoint_name(0, epoch, 1251)), m)
    assert [e for e, _, _ in ckpt.list_checkpoints(str(tmp_path))] == [30, 25, 20, 15, 10, 5]
    ckpt.prune_checkpoints(str(tmp_path), keep=5)
    assert sorted(os.listdir(tmp_path)) == [f"0-{e}_1251.ckpt" for e in (10, 15, 20, 25, 30)]
