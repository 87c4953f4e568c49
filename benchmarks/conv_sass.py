"""What the grouped-convolution kernels' main loops are made of, from their SASS.

    python benchmarks/conv_sass.py                  # the kernels and the reference copies
    python benchmarks/conv_sass.py --loops          # every loop of every kernel, too
    python benchmarks/conv_sass.py --cuobjdump /path/to/cuobjdump --arch sm_90

Compiles kernels/grouped_conv.cu and kernels/grouped_conv_bwd_weight.cu (and
the copies of the kernels they replaced, tests/cuda/reference_kernels/) with
nvcc for sm_90, with the -D defines their launchers pass for ResNeXt50_32x4d's
grouped convolutions (captured from the launchers themselves, run on traced
arrays: minitorch_gx.cuda.trace), disassembles the cubins with cuobjdump and,
per kernel, finds the loops (a backward branch closes one: the region from
its target to the branch). The main loop is the innermost loop holding the
most FFMAs (DFMA in float64); its enclosing loops are listed with it, because
an inner loop's body runs many times per pass of the outer one: static counts
of an outer loop understate its share of multiply-adds. Printed per loop:
instructions (NOPs left out), FFMA and their share, global loads (LDG), shared
loads and stores (LDS, STS), local-memory traffic (LDL, STL: register
spills), and the integer-division sequences in it: a division by a
run-time value compiles to I2F.RP + MUFU.RCP (the reciprocal) then IMAD.HI
and a correction (a CALL for 64 bits); with the divisor loop-invariant nvcc
hoists the reciprocal and leaves IMAD.HI in the loop, as it does for a
division by a constant: any of the three counts.

No GPU is needed; nvcc and cuobjdump are (cuobjdump: on PATH, --cuobjdump, or
the copy the `triton` package ships in backends/nvidia/bin).
"""
import argparse
import collections
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from minitorch_gx.cuda import conv as cuda_conv, trace  # noqa: E402
from minitorch_gx.cuda import device as cuda_device  # noqa: E402

KERNELS = REPO / "kernels"
REFERENCE = REPO / "tests" / "cuda" / "reference_kernels"
# The reference copies: the kernels grouped_conv.cu and grouped_conv_bwd_weight.cu replaced.
OLD = {"grouped_conv.cu": "grouped_conv_v1.cu",
       "grouped_conv_bwd_weight.cu": "grouped_conv_bwd_weight_v1.cu"}
# ResNeXt50_32x4d's grouped 3x3 convolutions (one per layer; the stride-2
# first blocks compile the same) and its stem: (name, C, H, K, groups, R, stride, pad)
SHAPES = [("layer1", 128, 56, 128, 32, 3, 1, 1),
          ("layer2", 256, 28, 256, 32, 3, 1, 1),
          ("layer3", 512, 14, 512, 32, 3, 1, 1),
          ("layer4", 1024, 7, 1024, 32, 3, 1, 1),
          ("stem", 3, 224, 64, 1, 7, 2, 3)]
FMA = {"float": "FFMA", "double": "DFMA"}


# --------------------------------------------------------------------------
# The defines: what the launchers pass, seen on traced arrays
# --------------------------------------------------------------------------
@contextlib.contextmanager
def _captured_launches():
    """Inside, launches on the traced GPU record (file, kernel, defines)."""
    seen, launch = [], trace.TracingDevice.launch

    def record(self, file, kernel, grid, block, args, shared_mem=0, defines=()):
        seen.append((file, kernel, tuple(defines)))
        return launch(self, file, kernel, grid, block, args, shared_mem, defines)
    trace.TracingDevice.launch = record
    try:
        with trace.fake_gpu(record=False):
            yield seen
    finally:
        trace.TracingDevice.launch = launch


def launcher_defines(shape, dtype=numpy.float32, batch=2):
    """{(file, kernel): defines} the three launchers pass for this shape (the
    defines do not depend on the batch, so a small one is traced)."""
    _, c, h, k, groups, r, stride, pad = shape
    x = numpy.zeros((batch, c, h, h), dtype)
    W = numpy.zeros((k, c // groups, r, r), dtype)
    with _captured_launches() as seen:
        xt = trace.to_gpu(x)
        y = cuda_conv.conv2d_forward(xt, trace.to_gpu(W), stride, pad, groups)
        cuda_conv.conv2d_backward_data(y, trace.to_gpu(W), x.shape, stride, pad, groups)
        cuda_conv.conv2d_backward_weight(y, xt, W.shape, stride, pad, groups)
    return {(file, kernel): defines for file, kernel, defines in seen}


# --------------------------------------------------------------------------
# Compiling and reading SASS
# --------------------------------------------------------------------------
def find_cuobjdump(given=None):
    if given:
        return given
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
        candidate = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    for root in (os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "cuobjdump").exists():
            return str(Path(root) / "bin" / "cuobjdump")
    sys.exit("conv_sass.py: no cuobjdump found (put it on PATH, install triton, or pass "
             "--cuobjdump PATH)")


def find_nvcc(given=None):
    found = given or shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists(
        "/usr/local/cuda/bin/nvcc") else None)
    if not found:
        sys.exit("conv_sass.py: no nvcc found (put it on PATH or pass --nvcc PATH)")
    return found


def sass(source, defines, arch, nvcc, cuobjdump, workdir):
    """{kernel: [(address, opcode, text)]} of ``source`` compiled with ``defines``."""
    cubin = Path(workdir) / f"{Path(source).stem}-{abs(hash(defines))}.cubin"
    cmd = [nvcc, "-std=c++17", f"-arch={arch}", "-cubin", *[f"-D{k}={v}" for k, v in defines],
           str(source), "-o", str(cubin)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"conv_sass.py: nvcc failed on {source}:\n{result.stderr}")
    text = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    kernels, current = {}, None
    for line in text.splitlines():
        m = re.search(r"Function\s*:\s*(\w+)", line)
        if m:
            current = kernels.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m and current is not None:
            body = re.sub(r"^@!?U?P[T\d]\s+", "", m.group(2))
            current.append((int(m.group(1), 16), body.split()[0], body))
    return kernels


Loop = collections.namedtuple("Loop", "start end")


def loops(code):
    """Every loop: the region from a backward branch's target to the branch."""
    found = set()
    for address, opcode, text in code:
        if opcode.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", text)
            if m and int(m.group(1), 16) <= address:
                found.add(Loop(int(m.group(1), 16), address))
    return sorted(found)


def stats(code, loop, fma):
    body = [(op, text) for address, op, text in code
            if loop.start <= address <= loop.end and op != "NOP"]
    ops = collections.Counter(op.split(".")[0] for op, _ in body)
    full = [op for op, _ in body]
    runtime_div = sum(1 for i, op in enumerate(full) if op.startswith("I2F") and ".RP" in op and
                      any(o.startswith("MUFU.RCP") for o in full[i:i + 8]))
    return {"instructions": len(body), "fma": ops[fma], "LDG": ops["LDG"], "LDS": ops["LDS"],
            "STS": ops["STS"], "local": ops["LDL"] + ops["STL"], "divisions": runtime_div,
            "calls": ops["CALL"],
            "imad_hi": sum(1 for op in full if op.startswith("IMAD.HI"))}


def contains(outer, inner):
    return outer != inner and outer.start <= inner.start and inner.end <= outer.end


def main_loop(code, fma):
    """(the innermost loop with the most FMAs, its enclosing loops, outermost last)."""
    all_loops = loops(code)
    if not all_loops:
        return None, []
    innermost = [lp for lp in all_loops if not any(contains(lp, o) for o in all_loops)]
    best = max(innermost, key=lambda lp: (stats(code, lp, fma)["fma"],
                                          stats(code, lp, fma)["instructions"]))
    outer = sorted((lp for lp in all_loops if contains(lp, best)),
                   key=lambda lp: lp.end - lp.start)
    return best, outer


def division(s):
    """The integer-division sequences a loop's stats show, or "none"."""
    found = [f"{s[key]} {what}" for key, what in (("divisions", "I2F.RP+MUFU.RCP"),
                                                  ("imad_hi", "IMAD.HI"), ("calls", "CALL"))
             if s[key]]
    return ", ".join(found) or "none"


def row(label, s):
    share = 100.0 * s["fma"] / max(1, s["instructions"])
    return (f"| {label} | {s['instructions']} | {s['fma']} | {share:.0f}% | {s['LDG']} | "
            f"{s['LDS']} | {s['STS']} | {s['local']} | {division(s)} |")


def report(title, source, defines, kernel, args, workdir):
    real = dict(defines).get("REAL", "float")
    fma = FMA[real]
    code = sass(source, defines, args.arch, args.nvcc, args.cuobjdump, workdir)[kernel]
    best, outer = main_loop(code, fma)
    lines = []
    if best is None:
        return [f"| {title} | (no loop) |"]
    lines.append(row(f"{title}: main loop", stats(code, best, fma)))
    for depth, lp in enumerate(outer, 1):
        lines.append(row(f"{title}: enclosing loop {depth}", stats(code, lp, fma)))
    if args.loops:
        for lp in loops(code):
            lines.append(row(f"{title}: loop 0x{lp.start:x}-0x{lp.end:x}", stats(code, lp, fma)))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--nvcc")
    parser.add_argument("--cuobjdump")
    parser.add_argument("--loops", action="store_true", help="list every loop too")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args(argv)
    args.nvcc, args.cuobjdump = find_nvcc(args.nvcc), find_cuobjdump(args.cuobjdump)
    dtype = numpy.dtype(args.dtype)
    header = ("| kernel [defines; shapes]: loop | instructions | FMA | FMA share | LDG | LDS | "
              "STS | LDL+STL (spills) | integer division |")
    print(header)
    print("| --- |" + " ---: |" * 7 + " --- |")
    old_defines = {f: d for f, d in cuda_device.builds(dtype)}
    builds = {}  # (label, kernel) -> {defines: [shape names]}: one report per build
    for shape in SHAPES:
        for (file, kernel), defines in sorted(launcher_defines(shape, dtype).items()):
            for label, source, defs in (("old", REFERENCE / OLD[file], old_defines[file]),
                                        ("new", KERNELS / file, defines)):
                builds.setdefault((label, kernel, source), {}).setdefault(defs, []).append(
                    shape[0])
    with tempfile.TemporaryDirectory() as workdir:
        for (label, kernel, source), by_defines in builds.items():
            for defs, shapes in by_defines.items():
                shown = " ".join(f"{k}={v}" for k, v in defs if k != "REAL")
                title = f"{label} {kernel} [{shown}; {', '.join(shapes)}]"
                for line in report(title, source, defs, kernel, args, workdir):
                    print(line, flush=True)


if __name__ == "__main__":
    main()
