"""benchmarks/bench_side_by_side.py, bench_min_block.py,
bench_gemm_orientation.py, bench_conv_threads.py and bench_blas_kernels.py,
run as a user runs them: bad settings are one error line, and a short run
reports every arm (not bench_blas_kernels.py's: its arms change
OPENBLAS_CORETYPE, which tests leave as the machine sets it)."""
import os
import re
import subprocess
import sys

import numpy
import pytest

from minitorch_gx import cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize("script, args, env, message", [
    ("bench_side_by_side.py", ["--rounds", "0"], {}, "--rounds >= 1"),
    ("bench_side_by_side.py", ["--image_size", "8"], {}, "--image_size >= 32"),
    ("bench_side_by_side.py", [], {"MINITORCH_GX_THREADS": "1"}, "needs 2 or more threads"),
    ("bench_side_by_side.py", [], {"MINITORCH_GX_THREADS": "two"}, "MINITORCH_GX_THREADS"),
    ("bench_min_block.py", ["--values", "524288"], {}, "two or more different values"),
    ("bench_min_block.py", ["--values", "1,x"], {}, "not a comma-separated list"),
    ("bench_min_block.py", ["--batch", "0"], {}, "--batch >= 1"),
    ("bench_min_block.py", [], {"MINITORCH_GX_THREADS": "1"}, "needs 2 or more threads"),
    ("bench_blas_kernels.py", ["--rounds", "0"], {}, "need --rounds >= 1"),
    ("bench_blas_kernels.py", ["--cores", "Haswell;rm"], {}, "a comma-separated list"),
    ("bench_gemm_orientation.py", ["--rounds", "3"], {}, "an even --rounds >= 2"),
    ("bench_gemm_orientation.py", ["--size", "16"], {}, "--size >= 32"),
    ("bench_conv_threads.py", ["--rounds", "0"], {}, "--rounds >= 1"),
    ("bench_conv_threads.py", [], {"MINITORCH_GX_THREADS": "1"}, "needs 2 or more threads")])
def test_bad_settings_are_one_line_before_any_work(script, args, env, message):
    done = _run(script, *args, env=env)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert message in done.stderr and done.stdout == ""


def test_side_by_side_reports_both_ways_and_the_rounds():
    done = _run("bench_side_by_side.py", "--batch", "2", "--image_size", "32", "--rounds", "2",
                env={"MINITORCH_GX_THREADS": "2"})
    assert done.returncode == 0, done.stderr
    for way in ("side by side", "in turn"):
        assert re.search(re.escape(way.ljust(12)) + r": median step +\d+ ms, backward of the "
                         r"kernels > 1x1 +[\d.]+ ms  \(steps ms: \[\d+, \d+\]\)",
                         done.stdout), done.stdout
    assert re.search(r"step: side by side faster in [0-2] of 2 rounds", done.stdout)
    assert re.search(r"their backward: side by side faster in [0-2] of 2 rounds", done.stdout)


def test_min_block_reports_every_value():
    done = _run("bench_min_block.py", "--batch", "2", "--image_size", "32", "--rounds", "1",
                "--values", "4096,1024,256", env={"MINITORCH_GX_THREADS": "2"})
    assert done.returncode == 0, done.stderr
    for value in (4096, 1024, 256):
        assert re.search(rf"\b{value}: step +\d+ ms, those passes +[\d.]+ ms \(bn forward [\d.]+, "
                         r"bn backward [\d.]+, add\+relu [\d.]+, relu backward [\d.]+, "
                         r"gradient adds [\d.]+\)", done.stdout), done.stdout


def test_min_block_varies_batch_norms_pieces_when_asked():
    done = _run("bench_min_block.py", "--batch", "2", "--image_size", "32", "--rounds", "1",
                "--vary", "bn_piece_bytes", "--values", "4194304,4096",
                env={"MINITORCH_GX_THREADS": "2"})
    assert done.returncode == 0, done.stderr
    assert "varying PIECE_BYTES (now 4194304)" in done.stdout, done.stdout
    for value in (4194304, 4096):
        assert re.search(rf"\b{value}: step +\d+ ms, those passes +[\d.]+ ms \(bn forward",
                         done.stdout), done.stdout


def test_gemm_orientation_reports_both_ways_and_results_that_agree():
    done = _run("bench_gemm_orientation.py", "--batch", "2", "--size", "32", "--rounds", "2")
    assert done.returncode == 0, done.stderr
    gemms = re.findall(r"^\S.*, (?:gW \(folded\)|y \(whole map\)) +\d+ +[\d.]+ +[\d.]+$",
                       done.stdout, re.MULTILINE)
    backwards = re.findall(r"^(.*\S) +\d +\d+ +[\d.]+ +[\d.]+ +(same|close|DIFF)$",
                           done.stdout, re.MULTILINE)
    assert gemms and backwards, done.stdout
    # float32 rounding with OpenBLAS's AVX2 kernels; the same bits with its AVX-512 ones
    allowed = ("same",) if cpu.blas_core() == "SkylakeX" else ("same", "close")
    assert all(bits in allowed for _, bits in backwards), done.stdout
    assert re.search(r"with the rule in force \(cols @ gy\^T when oCg <= 32\): [\d.]+ ms",
                     done.stdout), done.stdout


def test_the_orientation_check_tells_rounding_from_a_defect():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from bench_gemm_orientation import agreement
    finally:
        sys.path.pop(0)
    rng = numpy.random.default_rng(0)
    a, b = rng.standard_normal((2, 64, 144)).astype(numpy.float32)
    gW = a @ b.T                                                   # (64, 64)
    other_order = (b @ a.T).T                                      # the same sums, reordered
    assert agreement(gW, gW.copy()) == "same"
    assert agreement(gW, numpy.nextafter(gW, numpy.inf)) == "close"  # one ulp everywhere
    assert agreement(gW, other_order) in ("same", "close")
    assert agreement(gW, gW.T) == "DIFF"                           # a planted transposition
    assert agreement(gW, a[:, :64] @ b[:, :64].T) == "DIFF"        # a sum cut short


def test_conv_threads_reports_both_ways_and_the_rounds():
    done = _run("bench_conv_threads.py", "--arch", "resnext_mini", "--batch", "2",
                "--image_size", "32", "--rounds", "2", env={"MINITORCH_GX_THREADS": "2"})
    assert done.returncode == 0, done.stderr
    for way in ("split", "one thread"):
        assert re.search(re.escape(way.ljust(10)) + r": median step +\d+ ms, forward of the "
                         r"grouped convolutions +[\d.]+ ms, of the stem +[\d.]+ ms",
                         done.stdout), done.stdout
    for what in ("step", "grouped forward", "stem forward"):
        assert re.search(rf"{what}: split faster in [0-2] of 2 rounds", done.stdout), done.stdout
