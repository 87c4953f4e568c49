"""train.py and eval.py under ``mpirun -n 2 ... --run_distribute=1`` on the CPU:
one run folder, a log per rank, checkpoints from rank 0 only, eval counts
combined across ranks, and a failing rank ending the job."""
import os
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
        assert "epoch: 1 step: 3, loss is" in open(out / run / log).read()

    proc, _ = mpirun(2, "eval.py", "--run_distribute=1", f"--data_path={data / 'val'}",
                     f"--checkpoint_file_path={out / run / 'ckpt_0'}", *TINY[:2], "--num_workers",
                     "0", "--device_target", "CPU")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"top1_correct=\d+, tot=12, acc=\d+\.\d\d%\(TOP1\)", proc.stdout), proc.stdout


@needs_mpirun
def test_a_bad_data_folder_ends_the_whole_job(tmp_path):
    proc, seconds = mpirun(2, "train.py", "--run_distribute=1",
                           f"--data_path={tmp_path / 'missing'}", "--output_path",
                           str(tmp_path / "out"), *TINY)
    assert proc.returncode != 0
    assert re.search(r"rank \d: error: .*missing", proc.stderr), proc.stderr[-2000:]
    assert seconds < 60
