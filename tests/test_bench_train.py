"""benchmarks/bench_train.py, run as a user runs it: one-shot and alternating (``--rounds``)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_train.py")


def _run(*args, env=None):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env)


@pytest.mark.parametrize("args, message", [
    (["--rounds", "0"], "--rounds and --steps must be at least 1"),
    (["--steps", "0"], "--rounds and --steps must be at least 1"),
    (["--rounds", "2", "--no_torch"], "--rounds alternates with PyTorch"),
    (["--rounds", "2", "--arch", "resnext_mini"], "--rounds alternates with PyTorch")])
def test_bad_settings_are_one_line_before_any_work(args, message):
    done = _run(*args)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert message in done.stderr and done.stdout == ""


def test_a_one_shot_run_times_both_sides():
    """The default mode: our steps, then PyTorch in its own process and in
    ours, and both ratios (where torch and torchvision import)."""
    done = _run("--batch", "2", "--image_size", "32", "--steps", "2", "--warmup", "0")
    assert done.returncode == 0, done.stderr
    assert re.search(r"minitorch_gx: .*all steps ms: \[\d+, \d+\]", done.stdout)
    assert re.search(r"^cpu: .*, \d+ cores; NumPy's OpenBLAS kernels: \S", done.stdout,
                     re.MULTILINE), done.stdout
    if "PyTorch: not measured" not in done.stdout:
        assert re.search(r"PyTorch \(own process\): .*all steps ms: \[\d+, \d+\]", done.stdout)
        assert re.search(r"ratio minitorch_gx / PyTorch: [\d.]+ \(PyTorch as its users run it\); "
                         r"[\d.]+ \(PyTorch with memory retained", done.stdout)


def test_rounds_alternate_and_every_step_is_reported():
    """Two rounds of two steps: each side reports all four step times, and
    the count of rounds ours won is out of two (PyTorch's side only where
    torch and torchvision import)."""
    done = _run("--batch", "2", "--image_size", "32", "--rounds", "2", "--steps", "2",
                "--warmup", "0")
    assert done.returncode == 0, done.stderr
    ours = re.search(r"minitorch_gx: .*all steps ms: \[([^\]]*)\]", done.stdout)
    assert ours and len(ours.group(1).split(",")) == 4
    theirs = re.search(r"PyTorch \(own process\): .*all steps ms: \[([^\]]*)\]", done.stdout)
    if theirs is None:
        assert "PyTorch: not measured" in done.stdout
    else:
        assert len(theirs.group(1).split(",")) == 4
        assert re.search(r"ours faster in [0-2] of 2 rounds", done.stdout)


def test_without_torch_ours_is_still_timed(tmp_path):
    """torch that fails to import (a stand-in first on the path): the child
    says so and exits, and our steps are timed all the same, every round."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('no torch here')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    done = _run("--batch", "2", "--image_size", "32", "--rounds", "2", "--steps", "1",
                "--warmup", "0", env=env)
    assert done.returncode == 0, done.stderr
    assert "torch or torchvision does not import" in done.stderr
    assert re.search(r"minitorch_gx: .*all steps ms: \[\d+, \d+\]", done.stdout)  # both rounds
    assert "PyTorch: not measured" in done.stdout
