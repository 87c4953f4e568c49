"""train.py and eval.py under ``mpirun -n 2 ... --run_distribute=1`` on the CPU:
one run folder, a log per rank, checkpoints from rank 0 only, eval counts
combined across ranks, and a failing rank ending the job."""
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import time


from tests.distributed.launch import MPIRUN, REPO, needs_mpirun

ROOT = str(REPO)
TINY = ["--arch", "resnext_mini", "--image_size", "32", "--per_batch_size", "4",
        "--num_workers", "0", "--device_target", "CPU"]


def mpirun(n, *argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    start = time.monotonic()
    proc = subprocess.run([MPIRUN, "-n", str(n), sys.executable, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    return proc, time.monotonic() - start


@needs_mpirun
def test_two_ranks_train_and_evaluate(data, tmp_path):
    out = tmp_path / "out"
    proc, _ = mpirun(2, "train.py", "--run_distribute=1", f"--data_path={data / 'train'}",
                     "--output_path", str(out), "--max_epoch", "1", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = os.listdir(out)
    logs = sorted(f for f in os.listdir(out / run) if f.endswith(".log"))
    assert [re.sub(r".*_rank_", "", f) for f in logs] == ["0.log", "1.log"]
    # 30 images over 2 ranks: 15 each, 3 batches of 4; rank 0 alone saves
    assert sorted(os.listdir(out / run / "ckpt_0")) == ["0-1_3.ckpt", "metrics.jsonl"]
    for log in logs:
        assert "epoch: 1 step: 3, loss is" in pathlib.Path(out / run / log).read_text()

    proc, _ = mpirun(2, "eval.py", "--run_distribute=1", f"--data_path={data / 'val'}",
                     f"--checkpoint_file_path={out / run / 'ckpt_0'}", *TINY[:2], "--num_workers",
                     "0", "--device_target", "CPU")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"top1_correct=\d+, tot=12, acc=\d+\.\d\d%\(TOP1\)", proc.stdout), proc.stdout


@needs_mpirun
def test_two_ranks_validate_as_eval_py_does_and_log_every_epoch(data, tmp_path):
    out = tmp_path / "out"
    tensorboard = ["--tensorboard"] if importlib.util.find_spec("tensorboardX") else []
    proc, _ = mpirun(2, "train.py", "--run_distribute=1", f"--data_path={data / 'train'}",
                     f"--val_data_path={data / 'val'}", "--output_path", str(out),
                     "--max_epoch", "2", "--ckpt_interval", "1", *TINY, *tensorboard)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = os.listdir(out)
    with open(out / run / "ckpt_0" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["val_images"] for r in records] == [12, 12]  # both shards, combined
    for log in sorted(f for f in os.listdir(out / run) if f.endswith(".log")):
        text = pathlib.Path(out / run / log).read_text()
        for epoch in (1, 2):  # 3 steps an epoch, fewer than --log_interval: the last is logged
            assert f"epoch: {epoch} step: 3/3, loss" in text, (log, epoch)
            assert re.search(rf"run: epoch {epoch}/2 done, .* over 2 process\(es\)", text), log
    assert os.path.exists(out / run / "ckpt_0" / "best.ckpt")
    if tensorboard:
        assert os.listdir(out / run / "tensorboard")  # rank 0's events

    proc, _ = mpirun(2, "eval.py", "--run_distribute=1", f"--data_path={data / 'val'}",
                     f"--checkpoint_file_path={out / run / 'ckpt_0' / '0-2_3.ckpt'}", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    top1 = int(re.search(r"top1_correct=(\d+), tot=12", proc.stdout).group(1))
    top5 = int(re.search(r"top5_correct=(\d+), tot=12", proc.stdout).group(1))
    assert (records[-1]["val_top1"], records[-1]["val_top5"]) == (top1 / 12, top5 / 12)


@needs_mpirun
def test_a_bad_data_folder_ends_the_whole_job(tmp_path):
    proc, seconds = mpirun(2, "train.py", "--run_distribute=1",
                           f"--data_path={tmp_path / 'missing'}", "--output_path",
                           str(tmp_path / "out"), *TINY)
    assert proc.returncode != 0
    assert re.search(r"rank \d: error: .*missing", proc.stderr), proc.stderr[-2000:]
    assert seconds < 60


@needs_mpirun
def test_a_huge_learning_rate_stops_every_rank_together(data, tmp_path):
    out = tmp_path / "out"
    proc, seconds = mpirun(2, "train.py", "--run_distribute=1", f"--data_path={data / 'train'}",
                           "--output_path", str(out), "--max_epoch", "3", "--lr", "1e30",
                           "--dist_timeout", "30", *TINY)
    assert proc.returncode == 1, proc.stderr[-3000:]  # not 124: no rank was left waiting
    assert seconds < 25
    (run,) = os.listdir(out)
    for log in (f for f in os.listdir(out / run) if f.endswith(".log")):
        text = pathlib.Path(out / run / log).read_text()
        assert re.search(r"ERROR:epoch: \d step: \d+, loss is .*not finite \(on some rank\)", text)


@needs_mpirun
def test_a_refused_checkpoint_stops_every_rank_together(data, tmp_path):
    from tests.distributed.launch import SCRIPTS
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    start = time.monotonic()
    proc = subprocess.run([MPIRUN, "-n", "2", sys.executable, str(SCRIPTS / "poisoned_save.py"),
                           "--run_distribute=1", f"--data_path={data / 'train'}",
                           "--output_path", str(out), "--max_epoch", "4", "--ckpt_interval", "1",
                           "--dist_timeout", "30", *TINY], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert time.monotonic() - start < 25
    (run,) = os.listdir(out)
    assert sorted(os.listdir(out / run / "ckpt_0")) == ["0-1_3.ckpt", "metrics.jsonl"]
    logs = [pathlib.Path(out / run / f).read_text() for f in sorted(os.listdir(out / run))
            if f.endswith(".log")]
    assert "hold NaN or infinity (first: model/bn1.running_var)" in logs[0]
    assert "rank 0 refused to write a checkpoint" in logs[1]


@needs_mpirun
def test_ctrl_c_to_mpirun_stops_every_rank_at_one_step_and_resumes_exactly(data, tmp_path):
    import signal

    import numpy

    from resnext import checkpoint as ckpt
    args = ["--run_distribute=1", f"--data_path={data / 'train'}", "--max_epoch", "60",
            "--ckpt_interval", "60", *TINY]
    proc, _ = mpirun(2, "train.py", "--output_path", str(tmp_path / "straight"), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    out = tmp_path / "stopped"
    job = subprocess.Popen([MPIRUN, "-n", "2", sys.executable, "train.py", "--output_path",
                            str(out), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until both ranks are training
        logs = [os.path.join(r, f) for r in (out.glob("*")) for f in os.listdir(r)
                if f.endswith(".log")] if out.exists() else []
        if len(logs) == 2 and all("epoch: 2 step" in pathlib.Path(f).read_text() for f in logs):
            break
        time.sleep(0.05)
    job.send_signal(signal.SIGINT)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 130, stderr[-3000:]
    stops = [re.findall(r"stopping at epoch (\d+) step (\d+)", pathlib.Path(f).read_text())
             for f in logs]
    assert len(stops[0]) == 1 and stops[0] == stops[1], stops  # the same step on both ranks
    (run,) = os.listdir(out)
    proc, _ = mpirun(2, "train.py", "--run_distribute=1", "--resume", str(out / run),
                     "--output_path", str(tmp_path / "resumed"), "--num_workers", "0",
                     "--device_target", "CPU")
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = [ckpt.load_checkpoint(os.path.join(folder, os.listdir(folder)[0], "ckpt_0",
                                               "0-60_3.ckpt"))
             for folder in (tmp_path / "straight", tmp_path / "resumed")]
    for k, v in final[0][0].items():
        assert numpy.array_equal(v, final[1][0][k]), k
