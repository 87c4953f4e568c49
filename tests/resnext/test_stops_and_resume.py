"""Runs that can be trusted (issue 9): a stop at any moment resumes
bit-identically, signals are handled like Ctrl-C, no checkpoint holds a
non-finite array, --resume restores the run's own settings, run folders are
never shared, and bad flags are one line before any work."""
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy
import pytest

from resnext import checkpoint as ckpt
from resnext import trainer
from tests.resnext.test_train_eval import ROOT, TINY, final_weights, only_run

EPOCHS = ["--max_epoch", "2", "--ckpt_interval", "2", "--ckpt_save_max", "10"]


def common(data):
    return ["--data_path", str(data / "train")] + EPOCHS + TINY


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """The uninterrupted run every stopped-and-resumed run must equal."""
    out = tmp_path_factory.mktemp("straight")
    assert trainer.main(common(data) + ["--output_path", str(out)]) == 0
    return final_weights(only_run(out))


def assert_same_run(a, b):
    for k, v in a[0].items():
        assert numpy.array_equal(v, b[0][k]), k
    for i, s in a[1]["state"].items():
        assert numpy.array_equal(s["momentum_buffer"], b[1]["state"][i]["momentum_buffer"]), i
    assert a[2]["global_step"] == b[2]["global_step"]


def resume_and_compare(data, tmp_path, stopped_out, straight):
    """Resume from the newest checkpoint of the stopped run's folder."""
    run = only_run(stopped_out)
    assert trainer.main(["--output_path", str(tmp_path / "resumed"), "--resume", run]) == 0
    assert_same_run(straight, final_weights(only_run(tmp_path / "resumed")))


def kill_self(signum=signal.SIGINT):
    os.kill(os.getpid(), signum)


@pytest.mark.parametrize("where", ["end-of-forward", "after-backward", "twice-in-a-step"])
def test_a_signal_inside_a_step_resumes_bit_identically(where, data, tmp_path, monkeypatch,
                                                        straight):
    real_backward = trainer.cross_entropy
    calls = []

    def loss_then_signal(*args, **kwargs):
        loss = real_backward(*args, **kwargs)
        calls.append(1)
        if len(calls) == 10:  # the 3rd step of epoch 2, between forward and backward
            kill_self()
            if where == "twice-in-a-step":
                kill_self()
        return loss

    if where == "after-backward":
        real_check = trainer.SGD.nonfinite  # runs right after backward

        def signal_after_backward(self, loss=None):
            calls.append(1)
            if len(calls) == 10:
                kill_self(signal.SIGTERM)
            return real_check(self, loss)
        monkeypatch.setattr(trainer.SGD, "nonfinite", signal_after_backward)
    else:
        monkeypatch.setattr(trainer, "cross_entropy", loss_then_signal)
    code = trainer.main(common(data) + ["--output_path", str(tmp_path / "b")])
    assert code == (143 if where == "after-backward" else 130)
    monkeypatch.undo()
    names = os.listdir(os.path.join(only_run(tmp_path / "b"), "ckpt_0"))
    assert "0-2_3.ckpt" in names  # the interrupted step was completed, then saved
    resume_and_compare(data, tmp_path, tmp_path / "b", straight)


def test_a_signal_during_data_loading_resumes_bit_identically(data, tmp_path, monkeypatch,
                                                              straight):
    real_iter = trainer.Loader.__iter__

    def iterate_with_a_signal(self):
        for i, batch in enumerate(real_iter(self)):
            if self.epoch == 1 and i == 5:
                kill_self()  # while the 6th batch of epoch 2 is being fetched
            yield batch

    monkeypatch.setattr(trainer.Loader, "__iter__", iterate_with_a_signal)
    assert trainer.main(common(data) + ["--output_path", str(tmp_path / "b")]) == 130
    monkeypatch.undo()
    resume_and_compare(data, tmp_path, tmp_path / "b", straight)


def test_a_signal_during_a_checkpoint_write_keeps_the_save(data, tmp_path, monkeypatch,
                                                           straight):
    real_savez = numpy.savez

    def savez_interrupted(*args, **kwargs):
        kill_self()
        kill_self(signal.SIGTERM)  # a second signal 0 s later
        return real_savez(*args, **kwargs)

    args = ["--data_path", str(data / "train"), "--max_epoch", "2", "--ckpt_interval", "1",
            "--ckpt_save_max", "10"] + TINY
    monkeypatch.setattr(ckpt.numpy, "savez", savez_interrupted)
    assert trainer.main(args + ["--output_path", str(tmp_path / "b")]) == 130
    monkeypatch.undo()
    names = sorted(os.listdir(os.path.join(only_run(tmp_path / "b"), "ckpt_0")))
    assert names == ["0-1_7.ckpt", "metrics.jsonl"]  # the save that was interrupted is whole
    ckpt.load_checkpoint(os.path.join(only_run(tmp_path / "b"), "ckpt_0", "0-1_7.ckpt"))
    resume_and_compare(data, tmp_path, tmp_path / "b", straight)


def test_sigterm_to_a_real_process_saves_and_exits_143(data, tmp_path):
    # long enough that the signal surely comes before the end (the tiny run
    # takes ~15 ms a step), compared with the same run never stopped
    args = ["--data_path", str(data / "train"), "--max_epoch", "40", "--ckpt_interval", "40"] + \
        TINY
    assert trainer.main(args + ["--output_path", str(tmp_path / "a")]) == 0
    straight = final_weights(only_run(tmp_path / "a"))
    out = tmp_path / "b"
    cmd = [sys.executable, "train.py", "--output_path", str(out)] + args + \
        ["--num_workers", "1"]  # a worker process, which must not die of the signal first
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until it is training (its first step line)
        run = os.listdir(out) if out.exists() else []
        logs = [os.path.join(out, run[0], f) for f in os.listdir(out / run[0])
                if f.endswith(".log")] if run else []
        if logs and "epoch: 1 step:" in pathlib.Path(logs[0]).read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "SIGTERM: stopping after the current step" in stderr
    assert "Traceback" not in stderr
    log = pathlib.Path(logs[0]).read_text()
    assert re.search(r"stopping at epoch \d step \d+ on a signal", log)
    assert re.search(r"saved checkpoint .*\.ckpt", log)
    resume_and_compare(data, tmp_path, out, straight)


# ---------------------------------------------------------------------------
# No poisoned checkpoints
# ---------------------------------------------------------------------------
def all_checkpoints_finite(run):
    for _, _, path in ckpt.list_checkpoints(os.path.join(run, "ckpt_0")):
        state, optim, _ = ckpt.load_checkpoint(path)
        arrays = list(state.values()) + [s["momentum_buffer"] for s in optim["state"].values()]
        assert all(numpy.isfinite(a).all() for a in arrays if a.dtype.kind == "f"), path


def log_of(run):
    return pathlib.Path(run, next(f for f in os.listdir(run) if f.endswith(".log"))).read_text()


# these runs diverge on purpose (a huge learning rate): NumPy's overflow and
# invalid-value warnings on the way to the stop are expected
DIVERGES = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                      "ignore:invalid value encountered:RuntimeWarning")


@DIVERGES
def test_a_huge_learning_rate_stops_with_no_poisoned_checkpoint(data, tmp_path):
    out = tmp_path / "out"
    code = trainer.main(["--data_path", str(data / "train"), "--output_path", str(out),
                         "--max_epoch", "3", "--ckpt_interval", "1"] + TINY[:-2] +
                        ["--lr", "1e30"])
    assert code == 1
    run = only_run(out)
    all_checkpoints_finite(run)
    log = log_of(run)
    assert re.search(r"ERROR:epoch: \d step: \d+, loss is .*not finite", log)
    found = ckpt.list_checkpoints(os.path.join(run, "ckpt_0"))
    if found:
        assert f"the newest good checkpoint is {found[0][2]}" in log
    else:
        assert "no checkpoint was written in this run" in log


def weights_and_momentum(run):
    """The state one SGD step changes (not the BN statistics, which forward updates)."""
    state = {k: v.copy() for k, v in run.model.state_dict().items()
             if "running" not in k and "num_batches" not in k}
    return state, run.optimizer.flat_momentum.copy()


def test_a_non_finite_gradient_is_not_applied(data, tmp_path, monkeypatch):
    real_step, calls, seen = trainer.Run.step, [], {}

    def poisoned_gradient(self, images, labels):
        calls.append(1)
        if len(calls) == 9:  # a finite loss, an infinite gradient in one parameter
            seen["run"], seen["before"] = self, weights_and_momentum(self)
            p = next(iter(self.model.parameters()))
            p.register_post_accumulate_grad_hook(lambda t: t.grad.fill(numpy.inf))
        return real_step(self, images, labels)

    monkeypatch.setattr(trainer.Run, "step", poisoned_gradient)
    out = tmp_path / "out"
    assert trainer.main(["--data_path", str(data / "train"), "--output_path", str(out),
                         "--max_epoch", "3", "--ckpt_interval", "1"] + TINY) == 1
    (state, momentum), (state_before, momentum_before) = (weights_and_momentum(seen["run"]),
                                                          seen["before"])
    for k, v in state_before.items():
        assert numpy.array_equal(state[k], v), k  # the poisoned step changed nothing
    assert numpy.array_equal(momentum, momentum_before)
    run = only_run(out)
    assert sorted(os.listdir(os.path.join(run, "ckpt_0"))) == ["0-1_7.ckpt", "metrics.jsonl"]
    assert f"the newest good checkpoint is {os.path.join(run, 'ckpt_0', '0-1_7.ckpt')}" in \
        log_of(run)
    all_checkpoints_finite(run)


def test_a_non_finite_running_variance_is_never_saved(data, tmp_path, monkeypatch):
    real_end = trainer.Run._end_epoch

    def overflow_at_epoch_2(self, epoch_index, *args):
        if epoch_index == 1:
            self.model.bn1.running_var[0] = numpy.inf  # as a float32 overflow leaves it
        return real_end(self, epoch_index, *args)

    monkeypatch.setattr(trainer.Run, "_end_epoch", overflow_at_epoch_2)
    out = tmp_path / "out"
    assert trainer.main(["--data_path", str(data / "train"), "--output_path", str(out),
                         "--max_epoch", "3", "--ckpt_interval", "1"] + TINY) == 1
    run = only_run(out)
    assert sorted(os.listdir(os.path.join(run, "ckpt_0"))) == ["0-1_7.ckpt", "metrics.jsonl"]
    log = log_of(run)
    assert "hold NaN or infinity (first: model/bn1.running_var)" in log
    assert "the newest good checkpoint is" in log and "0-1_7.ckpt" in log
    all_checkpoints_finite(run)


# ---------------------------------------------------------------------------
# On a GPU the host reads the steps' results every --log_interval steps, not
# after each (a read waits for the device). Run here on the CPU with the GPU's
# interval, the same decisions must come out.
# ---------------------------------------------------------------------------
@pytest.fixture
def reads_every_4_steps(monkeypatch):
    """The trainer reads its device values every 4 steps; yields the number
    of steps each read covered."""
    reads, real = [], trainer.host_values

    def counted(pending):
        reads.append(len(pending))
        return real(pending)
    monkeypatch.setattr(trainer.Run, "read_interval", lambda self: 4)
    monkeypatch.setattr(trainer, "host_values", counted)
    return reads


def test_reading_every_4_steps_trains_the_same_run(data, tmp_path, reads_every_4_steps,
                                                   straight):
    assert trainer.main(common(data) + ["--output_path", str(tmp_path / "b")]) == 0
    # 7 steps an epoch: read after steps 4 and 7, never after each step
    assert reads_every_4_steps == [4, 3, 4, 3]
    assert_same_run(straight, final_weights(only_run(tmp_path / "b")))


@DIVERGES
def test_reading_every_4_steps_stops_at_the_same_non_finite_step(data, tmp_path, monkeypatch):
    args = ["--data_path", str(data / "train"), "--max_epoch", "3", "--ckpt_interval", "1"] + \
        TINY[:-2] + ["--lr", "1e30"]
    assert trainer.main(args + ["--output_path", str(tmp_path / "a")]) == 1
    first_bad = re.search(r"ERROR:epoch: \d step: \d+", log_of(only_run(tmp_path / "a"))).group(0)
    monkeypatch.setattr(trainer.Run, "read_interval", lambda self: 4)
    assert trainer.main(args + ["--output_path", str(tmp_path / "b")]) == 1
    run = only_run(tmp_path / "b")
    assert re.search(r"ERROR:epoch: \d step: \d+", log_of(run)).group(0) == first_bad
    all_checkpoints_finite(run)


def test_one_process_stops_at_once_on_a_signal_between_reads(data, tmp_path, monkeypatch,
                                                             reads_every_4_steps, straight):
    real_loss, calls = trainer.cross_entropy, []

    def loss_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10:  # the 3rd step of epoch 2: not a step the reads fall on
            kill_self()
        return real_loss(*args, **kwargs)
    monkeypatch.setattr(trainer, "cross_entropy", loss_then_signal)
    assert trainer.main(common(data) + ["--output_path", str(tmp_path / "b")]) == 130
    monkeypatch.undo()
    assert reads_every_4_steps == [4, 3, 3]  # epoch 2: read at once after its step 3
    names = os.listdir(os.path.join(only_run(tmp_path / "b"), "ckpt_0"))
    assert "0-2_3.ckpt" in names
    resume_and_compare(data, tmp_path, tmp_path / "b", straight)


# ---------------------------------------------------------------------------
# --resume takes the run's own settings
# ---------------------------------------------------------------------------
def test_resume_takes_the_runs_settings_and_refuses_contradictions(data, tmp_path, capsys):
    args = ["--data_path", str(data / "train"), "--max_epoch", "1"] + TINY
    assert trainer.main(args + ["--output_path", str(tmp_path / "a")]) == 0
    run = only_run(tmp_path / "a")
    # no --arch, --image_size or batch size: they come from the checkpoint
    assert trainer.main(["--resume", os.path.join(run, "ckpt_0"), "--max_epoch", "1",
                         "--output_path", str(tmp_path / "b")]) == 0
    log = log_of(only_run(tmp_path / "b"))
    assert re.search(r"resumed from .*0-1_7\.ckpt: epoch 1, 7 steps of it done \(global step 7\)"
                     r", learning rate", log)
    assert "arch resnext_mini" in log and "batch 4 per process, image 32" in log
    with pytest.raises(trainer.UserError, match=r"--per_batch_size 8 \(the run has 4\); "
                                                r"--lr 0\.1 \(the run has 0\.05\)"):
        trainer.main(["--resume", run, "--per_batch_size", "8", "--lr", "0.1",
                      "--output_path", str(tmp_path / "c")])
    assert not (tmp_path / "c").exists()  # refused before any work


# ---------------------------------------------------------------------------
# Folders and files
# ---------------------------------------------------------------------------
def test_two_runs_in_the_same_second_never_share_a_folder(tmp_path, monkeypatch):
    from resnext import runtime
    monkeypatch.setattr(runtime.time, "localtime", lambda when=None: time.gmtime(0))
    names = [runtime.make_run_folder(str(tmp_path)) for _ in range(3)]
    assert names == ["1970-01-01_time_00_00_00", "1970-01-01_time_00_00_00_1",
                     "1970-01-01_time_00_00_00_2"]


def test_checkpoints_follow_the_umask_and_stale_parts_are_removed(data, tmp_path):
    stale = tmp_path / "out" / "old_run" / "ckpt_0"
    stale.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (stale / f".tmp-{dead}-abcd.ckpt.part").write_bytes(b"half a save")
    (stale / f".tmp-{os.getppid()}-live.ckpt.part").write_bytes(b"a save in progress")
    old = os.umask(0o022)
    try:
        assert trainer.main(["--data_path", str(data / "train"), "--output_path",
                             str(tmp_path / "out"), "--max_epoch", "1"] + TINY) == 0
    finally:
        os.umask(old)
    left = sorted(os.listdir(stale))
    assert left == [f".tmp-{os.getppid()}-live.ckpt.part"]  # only a live process's is kept
    runs = [d for d in os.listdir(tmp_path / "out") if d != "old_run"]
    path = ckpt.list_checkpoints(os.path.join(tmp_path, "out", runs[0], "ckpt_0"))[0][2]
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_a_full_disk_is_one_line_and_earlier_checkpoints_stay(data, tmp_path, monkeypatch):
    import errno
    real_savez, calls = numpy.savez, []

    def full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_savez(*args, **kwargs)

    monkeypatch.setattr(ckpt.numpy, "savez", full_disk)
    with pytest.raises(trainer.UserError, match="No space left on device; the earlier "
                                                "checkpoints in .* are intact"):
        trainer.main(["--data_path", str(data / "train"), "--output_path", str(tmp_path / "o"),
                      "--max_epoch", "2", "--ckpt_interval", "1"] + TINY)
    folder = os.path.join(only_run(tmp_path / "o"), "ckpt_0")
    assert sorted(f for f in os.listdir(folder) if not f.startswith(".")) == \
        ["0-1_7.ckpt", "metrics.jsonl"]
    assert not [f for f in os.listdir(folder) if f.endswith(".part")]


# ---------------------------------------------------------------------------
# Bad flags: one line, non-zero exit, before any work
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("flags,says", [
    (["--ckpt_interval", "0"], "--ckpt_interval 0: must be at least 1"),
    (["--ckpt_save_max", "0"], "--ckpt_save_max 0: must be at least 1"),
    (["--per_batch_size", "0"], "--per_batch_size 0: must be at least 1"),
    (["--image_size", "-5"], "--image_size -5: must be at least 32"),
    (["--image_size", "7"], "--image_size 7: must be at least 32"),
    (["--image_size", "0"], "--image_size 0: must be at least 32"),
    (["--log_interval", "0"], "--log_interval 0: must be at least 1"),
    (["--steps_per_epoch", "-1"], "--steps_per_epoch -1: must be at least 1"),
    (["--label_smooth_factor", "1.5"], "--label_smooth_factor 1.5: must be in [0, 1)"),
    (["--lr", "-0.1"], "--lr -0.1: must be greater than 0"),
    (["--min_crop_scale", "2"], "--min_crop_scale 2.0: must be in (0, 1]"),
    (["--tf32"], "--tf32 is a cuBLAS setting for GPU runs; this run is on the CPU"),
])
def test_bad_flags_are_one_line_before_any_work(flags, says, tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--device_target", "CPU", "--output_path",
                        str(tmp_path / "out")] + flags, cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {says}"), r.stderr
    assert not (tmp_path / "out").exists()  # nothing was started


def test_an_output_path_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    r = subprocess.run([sys.executable, "train.py", "--device_target", "CPU", "--output_path",
                        str(tmp_path / "file" / "sub")], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        f"error: --output_path {tmp_path / 'file' / 'sub'}: {tmp_path / 'file'} is a file, "
        f"not a folder"], r.stderr


def test_ctrl_c_while_setting_up_is_one_line_and_exit_130(data, tmp_path, monkeypatch, capsys):
    from resnext.runtime import main_guard

    def interrupted(self):
        raise KeyboardInterrupt  # as Ctrl-C while the model is being built
    monkeypatch.setattr(trainer.Run, "_make_model", interrupted)
    with pytest.raises(SystemExit) as e:
        main_guard(lambda: trainer.main(common(data) + ["--output_path", str(tmp_path / "o")]))
    assert e.value.code == 130
    assert capsys.readouterr().err.splitlines() == [
        "interrupted (Ctrl-C); the checkpoints already written are intact"]


def test_a_text_file_as_weights_says_what_weights_should_be(data, tmp_path):
    (tmp_path / "weights.npz").write_text("not weights")
    r = subprocess.run([sys.executable, "train.py", "--device_target", "CPU", "--output_path",
                        str(tmp_path / "out"), "--checkpoint_file_path",
                        str(tmp_path / "weights.npz"), "--data_path", str(data / "train")] + TINY,
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "allow_pickle" not in lines[0]
    assert "expected a .ckpt or .npz written by train.py" in lines[0] and ".pth" in lines[0]


@pytest.mark.parametrize("flags,says", [
    (["--image_size", "7"], "--image_size 7: must be at least 32"),
    (["--per_batch_size", "0"], "--per_batch_size 0: must be at least 1"),
    (["--dist_timeout", "0"], "--dist_timeout 0.0: must be greater than 0"),
])
def test_bad_eval_flags_are_one_line_before_any_work(flags, says, tmp_path):
    r = subprocess.run([sys.executable, "eval.py", "--device_target", "CPU", "--output_path",
                        str(tmp_path / "none")] + flags, cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {says}"), r.stderr
