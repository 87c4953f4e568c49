"""train.py and eval.py end to end on a tiny generated dataset: run folder,
checkpoint names, log lines, resume, warm start, errors."""
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy
import pytest

from resnext import checkpoint as ckpt
from resnext import trainer
from resnext.evaluate import main as eval_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--arch", "resnext_mini", "--image_size", "32", "--per_batch_size", "4",
        "--num_workers", "0", "--device_target", "CPU", "--lr", "0.05"]


def only_run(out):
    runs = os.listdir(out)
    assert len(runs) == 1, runs
    return os.path.join(out, runs[0])


def final_weights(run_dir):
    newest = ckpt.list_checkpoints(os.path.join(run_dir, "ckpt_0"))[0][2]
    return ckpt.load_checkpoint(newest)


def test_train_writes_the_originals_layout_and_eval_reads_it(data, tmp_path, capsys):
    out = tmp_path / "out"
    assert trainer.main(["--data_path", str(data / "train"), "--output_path", str(out),
                         "--max_epoch", "2", "--ckpt_interval", "1"] + TINY) == 0
    run = only_run(out)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_time_\d\d_\d\d_\d\d", os.path.basename(run))
    names = sorted(os.listdir(os.path.join(run, "ckpt_0")))
    assert names == ["0-1_7.ckpt", "0-2_7.ckpt", "metrics.jsonl"]   # 30 images // 4 = 7 steps
    logs = [f for f in os.listdir(run) if f.endswith(".log")]
    assert len(logs) == 1 and re.fullmatch(r".+_rank_0\.log", logs[0])
    text = pathlib.Path(os.path.join(run, logs[0])).read_text()
    line = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}:INFO:"
    assert re.search(line + r"epoch: 2 step: 7, loss is \d+\.\d+", text)
    assert re.search(line + r"epoch time: \d+\.\d+ ms, per step time: \d+\.\d+ ms", text)
    metrics = pathlib.Path(run, "ckpt_0", "metrics.jsonl").read_text()
    records = [json.loads(x) for x in metrics.splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and records[1]["global_step"] == 14

    capsys.readouterr()
    assert eval_main(["--data_path", str(data / "val"), "--checkpoint_file_path",
                      os.path.join(run, "ckpt_0"), "--num_workers", "0",
                      "--device_target", "CPU"]) == 0
    printed = capsys.readouterr().out
    order = re.findall(r"evaluating .*?(0-\d_7\.ckpt)", printed)
    assert order == ["0-2_7.ckpt", "0-1_7.ckpt"]                      # newest epoch first
    assert len(re.findall(r"Inference Performance: \d+\.\d+ img/sec", printed)) == 2
    top1 = re.findall(r"top1_correct=(\d+), tot=12, acc=(\d+\.\d\d)%\(TOP1\)", printed)
    top5 = re.findall(r"top5_correct=(\d+), tot=12, acc=100\.00%\(TOP5\)", printed)
    assert len(top1) == 2 and len(top5) == 2     # 3 classes: top-5 is always right
    assert all(abs(100 * int(c) / 12 - float(a)) < 0.01 for c, a in top1)
    assert "summary: 2 checkpoint(s) on 12 images" in printed


def test_resume_equals_uninterrupted(data, tmp_path):
    common = ["--data_path", str(data / "train"), "--max_epoch", "2", "--ckpt_interval", "1",
              "--ckpt_save_max", "10"] + TINY
    assert trainer.main(common + ["--output_path", str(tmp_path / "a")]) == 0
    straight = final_weights(only_run(tmp_path / "a"))

    # stop after epoch 1 by resuming from its checkpoint in a fresh run
    first = os.path.join(only_run(tmp_path / "a"), "ckpt_0", "0-1_7.ckpt")
    assert trainer.main(common + ["--output_path", str(tmp_path / "b"), "--resume", first]) == 0
    resumed = final_weights(only_run(tmp_path / "b"))
    for k, v in straight[0].items():
        assert numpy.array_equal(v, resumed[0][k]), k
    for i, s in straight[1]["state"].items():
        assert numpy.array_equal(s["momentum_buffer"], resumed[1]["state"][i]["momentum_buffer"])
    assert resumed[2]["global_step"] == straight[2]["global_step"] == 14


def test_warm_start_loads_weights_only(data, tmp_path):
    assert trainer.main(["--data_path", str(data / "train"), "--output_path", str(tmp_path / "a"),
                         "--max_epoch", "1"] + TINY) == 0
    weights = ckpt.list_checkpoints(os.path.join(only_run(tmp_path / "a"), "ckpt_0"))[0][2]
    args = trainer.train_parser().parse_args(
        ["--data_path", str(data / "train"), "--output_path", str(tmp_path / "b"),
         "--checkpoint_file_path", weights] + TINY)
    run = trainer.Run(args)
    expected = ckpt.load_checkpoint(weights)[0]
    for k, v in run.model.state_dict().items():
        assert numpy.array_equal(v, expected[k]), k
    assert not run.optimizer.flat_momentum.any() and run.scheduler.last_step == -1


def run_script(*argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_missing_data_folder_is_one_clear_line(tmp_path):
    r = run_script("train.py", "--data_path", str(tmp_path / "nope"), "--device_target", "CPU",
                   "--output_path", str(tmp_path / "out"))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope" in lines[0] and lines[0].startswith("error:"), r.stderr


def test_eval_of_missing_checkpoint_is_one_clear_line(data, tmp_path):
    r = run_script("eval.py", "--data_path", str(data / "val"), "--device_target", "CPU",
                   "--checkpoint_file_path", str(tmp_path / "none.ckpt"))
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        f"error: --checkpoint_file_path {tmp_path / 'none.ckpt'}: no such file or folder"]


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
@pytest.mark.parametrize("name, value, line", [
    ("MINITORCH_GX_THREADS", "two", "MINITORCH_GX_THREADS='two' is not a whole number of threads"),
    ("MINITORCH_GX_KEEP_AWAKE", "yes",
     "MINITORCH_GX_KEEP_AWAKE='yes': use 1 (keep the cores awake) or 0")])
def test_a_bad_cpu_setting_is_one_clear_line_before_any_work(tmp_path, script, monkeypatch,
                                                             name, value, line):
    monkeypatch.setenv(name, value)
    r = run_script(script, "--synthetic" if script == "train.py" else "--device_target", *(
        ["--output_path", str(tmp_path / "out")] if script == "train.py" else ["CPU"]))
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [f"error: {line}"], r.stderr
    assert not (tmp_path / "out").exists()  # no run folder made


def test_cpu_training_and_evaluation_run_with_the_cores_awake(data, tmp_path, monkeypatch,
                                                             capsys):
    """train.py's and eval.py's CPU loops run inside cpu.cores_awake
    (minitorch_gx/cpu.py), which ends with them."""
    from minitorch_gx import cpu
    from resnext import evaluate
    inside, seen = [0], {"step": [], "eval": []}

    class Spy(cpu.cores_awake):
        def __enter__(self):
            inside[0] += 1
            return super().__enter__()

        def __exit__(self, *exc):
            inside[0] -= 1
            return super().__exit__(*exc)

    def watch(name, fn):
        def watched(*args, **kwargs):
            seen[name].append(inside[0])
            return fn(*args, **kwargs)
        return watched
    monkeypatch.setattr(cpu, "cores_awake", Spy)
    monkeypatch.setattr(trainer.Run, "step", watch("step", trainer.Run.step))
    monkeypatch.setattr(evaluate, "normalize", watch("eval", evaluate.normalize))
    out = tmp_path / "out"
    assert trainer.main(["--data_path", str(data / "train"), "--output_path", str(out),
                         "--max_epoch", "1"] + TINY) == 0
    assert seen["step"] == [1] * 7 and inside[0] == 0
    assert eval_main(["--data_path", str(data / "val"), "--checkpoint_file_path",
                      os.path.join(only_run(out), "ckpt_0"), "--num_workers", "0",
                      "--device_target", "CPU"]) == 0
    assert seen["eval"] and set(seen["eval"]) == {1} and inside[0] == 0


def test_gpu_without_a_gpu_is_a_clear_error(tmp_path):
    from minitorch_gx import backend
    if backend.gpu_available():
        pytest.skip("a GPU is present")
    r = run_script("train.py", "--device_target", "GPU", "--synthetic",
                   "--output_path", str(tmp_path))
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "GPU" in r.stderr


def test_synthetic_mode_trains_without_data(tmp_path):
    out = tmp_path / "out"
    assert trainer.main(["--synthetic", "--output_path", str(out), "--max_epoch", "1",
                         "--steps_per_epoch", "2", "--ckpt_interval", "1"] + TINY) == 0
    run = only_run(out)
    assert os.listdir(os.path.join(run, "ckpt_0")) and \
        sorted(os.listdir(os.path.join(run, "ckpt_0")))[0] == "0-1_2.ckpt"
    state, _, meta = ckpt.load_checkpoint(os.path.join(run, "ckpt_0", "0-1_2.ckpt"))
    assert state["fc.weight"].shape[0] == 1000 and meta["global_step"] == 2


def test_eval_skips_an_unreadable_image_and_says_so(data, tmp_path, capsys):
    import shutil
    val = tmp_path / "val"
    shutil.copytree(data / "val", val)
    (val / "n002" / "img_1.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    assert trainer.main(["--data_path", str(data / "train"), "--output_path", str(tmp_path / "o"),
                         "--max_epoch", "1"] + TINY) == 0
    capsys.readouterr()
    assert eval_main(["--data_path", str(val), "--output_path", str(tmp_path / "o"),
                      "--num_workers", "0", "--device_target", "CPU"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"top1_correct=\d+, tot=11, acc=", printed)      # 12 files, 11 readable
    assert "1 unreadable image(s) skipped" in printed and "img_1.JPEG" in printed
