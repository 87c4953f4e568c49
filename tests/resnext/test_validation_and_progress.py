"""What a user of torchvision's reference scripts or timm expects of a run
(issue 13): validation while training that equals eval.py, the best
checkpoint kept apart from the rotation, whole-run progress lines, a step
line in every epoch, TensorBoard scalars, and --help with every default."""
import json
import os
import pathlib
import re
import struct
import subprocess
import sys

import numpy
import pytest

from resnext import checkpoint as ckpt
from resnext import config, evaluate, trainer
from resnext.runtime import main_guard
from tests.resnext.test_train_eval import ROOT, TINY, only_run

THREE_EPOCHS = ["--max_epoch", "3", "--ckpt_interval", "1", "--ckpt_save_max", "1"]


def train(data, out, *flags):
    args = ["--data_path", str(data / "train"), "--output_path", str(out)] + TINY + list(flags)
    assert trainer.main(args) == 0
    return only_run(out)


def metrics(run):
    with open(os.path.join(run, "ckpt_0", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def log_of(run):
    return pathlib.Path(run, next(f for f in os.listdir(run) if f.endswith(".log"))).read_text()


@pytest.fixture(scope="module")
def validated(data, tmp_path_factory):
    """A 3-epoch run validated every epoch, with TensorBoard."""
    pytest.importorskip("tensorboardX", reason="the [tensorboard] extra is not installed")
    out = tmp_path_factory.mktemp("validated")
    return train(data, out, *THREE_EPOCHS, "--val_data_path", str(data / "val"), "--tensorboard")


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------
def test_validation_equals_eval_py_on_the_same_checkpoint(data, validated, capsys):
    last = metrics(validated)[-1]
    final = ckpt.list_checkpoints(os.path.join(validated, "ckpt_0"))[0][2]
    capsys.readouterr()
    assert evaluate.main(["--data_path", str(data / "val"), "--checkpoint_file_path", final,
                          "--device_target", "CPU", "--num_workers", "0",
                          "--per_batch_size", "4"]) == 0
    out = capsys.readouterr().out
    top1, total = map(int, re.search(r"top1_correct=(\d+), tot=(\d+)", out).groups())
    top5 = int(re.search(r"top5_correct=(\d+)", out).group(1))
    loss = float(re.search(r"loss=(\d+\.\d+)", out).group(1))
    assert (last["val_top1"], last["val_top5"], last["val_images"]) == \
        (top1 / total, top5 / total, total)
    assert round(last["val_loss"], 4) == loss
    assert re.search(rf"validation: epoch 3, top-1 {100 * top1 / total:.2f}% top-5 "
                     rf"{100 * top5 / total:.2f}% loss {loss:.4f} on 12 images", log_of(validated))


def test_validating_does_not_change_the_training(data, validated, tmp_path):
    plain = train(data, tmp_path / "plain", *THREE_EPOCHS)
    a, b = (ckpt.list_checkpoints(os.path.join(r, "ckpt_0"))[0][2] for r in (plain, validated))
    (wa, _, _), (wb, _, _) = ckpt.load_checkpoint(a), ckpt.load_checkpoint(b)
    for k, v in wa.items():
        assert numpy.array_equal(v, wb[k]), k
    assert all("val_top1" not in m for m in metrics(plain))  # the original's run by default
    assert not os.path.exists(os.path.join(plain, "ckpt_0", trainer.BEST_NAME))


def test_the_best_checkpoint_survives_the_rotation_and_resume_skips_it(data, tmp_path,
                                                                       monkeypatch):
    scores_by_call(monkeypatch, [1, 3, 2])  # top-1 of 1/12, 3/12, 2/12 on epochs 1, 2, 3
    run = train(data, tmp_path / "out", *THREE_EPOCHS, "--val_data_path", str(data / "val"))
    folder = os.path.join(run, "ckpt_0")
    assert sorted(os.listdir(folder)) == ["0-3_7.ckpt", "best.ckpt", "metrics.jsonl"]
    model, _, meta = ckpt.load_checkpoint(os.path.join(folder, "best.ckpt"))
    assert meta["epoch_index"] == 1 and meta["best"]["epoch"] == 2
    assert meta["best"]["top1"] == 3 / 12
    assert [m["best_top1"] for m in metrics(run)] == [1 / 12, 3 / 12, 3 / 12]
    assert "saved " + os.path.join(folder, "best.ckpt") in log_of(run)
    # the state of epoch 2: what a straight 2-epoch run of the same settings ends with
    two = train(data, tmp_path / "two", "--max_epoch", "3", "--ckpt_interval", "2")
    (epoch2, _, _) = ckpt.load_checkpoint(os.path.join(two, "ckpt_0", "0-2_7.ckpt"))
    for k, v in epoch2.items():
        assert numpy.array_equal(v, model[k]), k
    assert ckpt.resolve_resume_path(folder).endswith("0-3_7.ckpt")


def scores_by_call(monkeypatch, top1s):
    """trainer.evaluate's real scores, with top-1 counts ``top1s`` in call order."""
    real, calls = evaluate.evaluate, []  # the real one, however often patched

    def patched(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)._replace(top1=top1s[len(calls) - 1])
    monkeypatch.setattr(trainer, "evaluate", patched)


def test_the_best_so_far_carries_over_a_resume(data, tmp_path, monkeypatch):
    flags = ["--max_epoch", "3", "--ckpt_interval", "1", "--steps_per_epoch", "2",
             "--val_data_path", str(data / "val")]
    scores_by_call(monkeypatch, [5, 9, 4])
    run = train(data, tmp_path / "a", *flags)
    assert [m["best_top1"] for m in metrics(run)] == [5 / 12, 9 / 12, 9 / 12]
    scores_by_call(monkeypatch, [4])  # epoch 3 again, after resuming from epoch 2
    assert trainer.main(["--resume", os.path.join(run, "ckpt_0", "0-2_2.ckpt"),
                         "--output_path", str(tmp_path / "b")]) == 0
    resumed = only_run(tmp_path / "b")
    (record,) = metrics(resumed)
    assert (record["epoch"], record["val_top1"], record["best_top1"], record["best_epoch"]) == \
        (3, 4 / 12, 9 / 12, 2)
    # 4/12 is not better than the 9/12 of epoch 2: no new best.ckpt in the resumed run
    assert not os.path.exists(os.path.join(resumed, "ckpt_0", trainer.BEST_NAME))


# ---------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------
def test_every_epoch_logs_its_last_step_and_a_whole_run_line(data, validated):
    log = log_of(validated)
    for epoch in (1, 2, 3):  # 7 steps an epoch, --log_interval 20: only the last step
        assert re.search(rf"epoch: {epoch} step: 7/7, loss \d+\.\d+ \(epoch mean \d+\.\d+\), "
                         rf"lr \d+\.\d+, \d+\.\d img/s", log), epoch
        assert re.search(rf"run: epoch {epoch}/3 done, elapsed \d:\d\d:\d\d, ETA \d:\d\d:\d\d, "
                         rf"\d+\.\d img/s over 1 process\(es\); per step \d+\.\d ms: data "
                         rf"\d+\.\d ms, compute \d+\.\d ms", log), epoch
    assert "ETA 0:00:00" in log.split("run: epoch 3/3 done")[1].splitlines()[0]
    assert all(m["data_ms_per_step"] >= 0 for m in metrics(validated))


# ---------------------------------------------------------------------------
# TensorBoard
# ---------------------------------------------------------------------------
def read_events(folder):
    """{tag: [(step, value)]} from the event files of ``folder`` (TFRecord:
    length, its CRC, an Event protocol buffer, its CRC)."""
    from tensorboardX.proto import event_pb2
    scalars = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            while header := f.read(12):
                (length,) = struct.unpack("<Q", header[:8])
                event = event_pb2.Event.FromString(f.read(length))
                f.read(4)
                for v in event.summary.value:
                    scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars


def test_the_events_file_holds_the_logged_scalars(validated):
    scalars = read_events(os.path.join(validated, "tensorboard"))
    records = metrics(validated)
    steps = [7, 14, 21]
    assert scalars["val/top1"] == [(s, pytest.approx(m["val_top1"])) for s, m in
                                   zip(steps, records)]
    assert scalars["val/top5"] == [(s, pytest.approx(m["val_top5"])) for s, m in
                                   zip(steps, records)]
    assert scalars["val/loss"] == [(s, pytest.approx(m["val_loss"], rel=1e-6)) for s, m in
                                   zip(steps, records)]
    assert scalars["train/img_per_sec"] == [(s, pytest.approx(m["img_per_sec"], rel=1e-6))
                                            for s, m in zip(steps, records)]
    logged = [float(x) for x in re.findall(r"step: 7/7, loss (\d+\.\d+)", log_of(validated))]
    assert [s for s, _ in scalars["train/loss"]] == steps
    assert [round(v, 4) for _, v in scalars["train/loss"]] == pytest.approx(logged, abs=1e-4)
    assert [s for s, _ in scalars["train/lr"]] == steps


def test_tensorboard_without_the_extra_is_one_line(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails as if not installed
    with pytest.raises(SystemExit) as e:
        main_guard(lambda: trainer.main(["--data_path", str(data / "train"), "--output_path",
                                         str(tmp_path / "out"), "--tensorboard"] + TINY))
    assert e.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        'error: --tensorboard needs the optional extra: pip install -e ".[tensorboard]" (it '
        'installs tensorboardX)']
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("flags, says", [
    (["--eval_interval", "2"], "--eval_interval 2: needs --val_data_path"),
    (["--val_data_path", "/no/such/dir"], "--val_data_path /no/such/dir: no such folder"),
    (["--val_data_path", "{data}/val", "--eval_interval", "0"],
     "--eval_interval 0: must be at least 1 (epochs)"),
    (["--val_data_path", "{data}/val", "--synthetic"],
     "--val_data_path needs real training data, not --synthetic"),
    (["--val_data_path", "{data}/val/c0"], "--val_data_path {data}/val/c0: "),
])
def test_bad_validation_flags_are_one_line_before_any_work(flags, says, data, tmp_path):
    flags = [f.format(data=data) for f in flags]
    r = subprocess.run([sys.executable, "train.py", "--device_target", "CPU", "--output_path",
                        str(tmp_path / "out"), "--data_path", str(data / "train")] + flags,
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {says.format(data=data)}"), r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("parser", [config.train_parser, config.eval_parser],
                         ids=["train.py", "eval.py"])
def test_help_shows_a_text_and_a_default_for_every_flag(parser):
    p = parser()
    formatter = p._get_formatter()
    for action in p._actions:
        if action.dest == "help":
            continue
        text = formatter._get_help_string(action)
        assert action.help and len(action.help) > 10, action.dest
        assert "default" in text, f"--{action.dest}: {text!r}"


def test_the_terminal_bar_shows_the_mean_loss_and_stays(monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = trainer._Progress(4, 0, 0, 3, rank=0)
    for mean in (2.0, 1.5, 1.25, 1.125):
        bar.update(mean, 0.1, 100.0)
    bar.close()
    err = capsys.readouterr().err
    last = err.split("\r")[-1]
    assert last.startswith("epoch 1/3: 100%") and "loss=1.1250" in last
    assert last.endswith("\n")  # left on screen as the epoch's summary line
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert trainer._Progress(4, 0, 0, 3, rank=1).bar is None  # one bar, on rank 0


def test_the_eta_is_the_time_per_step_so_far_times_the_steps_left(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(trainer.time, "perf_counter", lambda: now[0])
    clock = trainer.RunClock(steps_per_epoch=10, max_epoch=5, start_epoch=1, start_batch=4)
    now[0] = 112.0      # the rest of epoch 2 (6 steps) took 12 s: 2 s a step
    clock.epoch_done(1, 6)
    assert (clock.elapsed(), clock.eta()) == (12.0, 2.0 * 30)  # epochs 3 to 5 left
    now[0] = 132.0      # epoch 3 in 20 s
    clock.epoch_done(2, 10)
    assert clock.eta() == pytest.approx(32.0 / 16 * 20)
