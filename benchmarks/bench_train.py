"""Training throughput of resnext50_32x4d: minitorch_gx against PyTorch, in the same run.

    python benchmarks/bench_train.py                     # CPU, batch 16, 224x224
    python benchmarks/bench_train.py --batch 32 --image_size 64
    python benchmarks/bench_train.py --batch 32 --image_size 64 --rounds 8   # alternating
    python benchmarks/bench_train.py --device gpu --batch 128

A step is forward, label-smoothed cross-entropy, backward and an SGD step. The
figure is the median img/s over --steps timed steps after --warmup untimed
ones. When torch and torchvision import, torchvision's resnext50_32x4d runs
the same steps on the same input (float32, TF32 off on the GPU so both sides
do float32 arithmetic; ``--tf32`` turns it on for both: our cuBLAS GEMMs,
PyTorch's cuBLAS and cuDNN) and the ratio ours/PyTorch is printed. Our step
is train.py's: the uint8 batch is normalised on the device each step (on a
GPU into the CNHW memory the rest of the step keeps), and on the CPU the
steps run inside ``minitorch_gx.cpu.cores_awake()`` as train.py's loop does
(``MINITORCH_GX_KEEP_AWAKE=0`` turns that off).

On the CPU, PyTorch runs twice: in its own process, as its users run it
(glibc's default malloc, which hands large freed blocks back to the kernel),
and in this process after ours, where it inherits the memory retention that
``import minitorch_gx`` sets (``minitorch_gx/cpu.py``), which speeds PyTorch
up too. Both ratios are printed; the first is what users of each get.

On this shared 2-core machine a run's minutes differ from the next's by
10-30%, and the one-shot run above times PyTorch's process and ours in
different minutes. ``--rounds R`` (CPU) alternates instead: PyTorch's own
process stays up, and R rounds of --steps steps go to each side in turn
(ours first in even rounds, PyTorch first in odd ones), so both sample the
same minutes; it prints each side's median over all its steps, their
ratio, and in how many rounds ours was the faster.
(``import minitorch_gx`` also sets OPENBLAS_THREAD_TIMEOUT when it comes
before NumPy, as in train.py; PyTorch computes with MKL and oneDNN, which
that setting does not touch.) On the CPU the figures are headed by the
CPU and the OpenBLAS kernels ours ran on, and OPENBLAS_CORETYPE where the
environment names them: OpenBLAS's AVX2 kernels ("Haswell") ran large
GEMMs at half the speed of its AVX-512 ones ("SkylakeX") on this
project's Zen 5 machine (``minitorch_gx/cpu.py``).
"""
import argparse
import contextlib
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import minitorch_gx as mt  # noqa: E402  (before NumPy, as train.py: see minitorch_gx/cpu.py)
import numpy  # noqa: E402
from minitorch_gx import backend, cpu  # noqa: E402
from minitorch_gx.functional import cross_entropy  # noqa: E402
from minitorch_gx.optim import SGD  # noqa: E402
from resnext.model import build_model  # noqa: E402
from resnext.trainer import param_groups  # noqa: E402
from resnext.transforms import normalize, normalize_reference  # noqa: E402


def time_steps(step, warmup, steps, sync=lambda: None):
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def random_batch(batch, image_size):
    """(uint8 images (batch, size, size, 3), int64 labels): the batch every step is timed on."""
    rng = numpy.random.default_rng(0)
    images = rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=numpy.uint8)
    return images, rng.integers(0, 1000, batch).astype(numpy.int64)


def ours_step(args, images_host, labels_host):
    """train.py's step on our resnext: forward, loss, backward, SGD."""
    xp = backend.cupy if args.device == "gpu" else numpy
    model = build_model(args.arch, 1000, seed=0)
    if args.device == "gpu":
        backend.set_tf32(args.tf32)
        model.to("gpu")
    model.train()
    opt = SGD(param_groups(model, 1e-4), lr=0.01, momentum=0.9)
    images, labels = xp.asarray(images_host), labels_host

    def step():
        opt.zero_grad()
        x = mt.Tensor(normalize(images, xp, numpy.float32))
        loss = cross_entropy(model(x), labels, label_smoothing=0.1)
        loss.backward()
        opt.step()
    return step


def cpu_step_for(args, needs):
    """train.py's CPU step on resnext50_32x4d (or ``args.arch``, where the
    caller has that option) at --batch/--image_size, after checking those
    and --rounds (and that there are two threads, which ``needs`` names):
    one error line and exit 2 otherwise. Returns (step, threads)."""
    if args.batch < 1 or args.image_size < 32 or args.rounds < 1:
        sys.exit("error: need --batch >= 1, --image_size >= 32 and --rounds >= 1")
    try:
        threads = cpu.threads()
    except ValueError as e:  # a bad MINITORCH_GX_THREADS
        sys.exit(f"error: {e}")
    if threads < 2:
        sys.exit(f"error: {needs} needs 2 or more threads (MINITORCH_GX_THREADS)")
    arch = getattr(args, "arch", "resnext50_32x4d")
    step = ours_step(argparse.Namespace(device="cpu", arch=arch, tf32=False),
                     *random_batch(args.batch, args.image_size))
    return step, threads


def alternate_steps(step, arms, rounds, spent=None):
    """Steps alternating between settings in ABBA order in one process, so
    that the drift of a shared machine falls on all alike. ``arms``: name ->
    a context manager factory, inside which that setting holds; each round
    runs, for each arm, one untimed step and one timed one inside it, with
    the counters of ``spent`` (a dict the step's timers add seconds to)
    zeroed before the timed one. Returns {arm: {"step": [seconds per round],
    counter: [seconds per round], ...}}."""
    spent = {} if spent is None else spent
    names = list(arms)
    times = {name: {"step": [], **{k: [] for k in spent}} for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            with arms[name]():
                step()
                spent.update(dict.fromkeys(spent, 0.0))
                t0 = time.perf_counter()
                step()
                times[name]["step"].append(time.perf_counter() - t0)
            for k, v in spent.items():
                times[name][k].append(v)
    return times


@contextlib.contextmanager
def setting(owner, name, value):
    """Inside: ``owner.name`` is ``value`` (an arm of ``alternate_steps``)."""
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def bench_ours(args, images_host, labels_host):
    step = ours_step(args, images_host, labels_host)
    if args.device == "gpu":
        return time_steps(step, args.warmup, args.steps, backend.cupy.cuda.Device().synchronize)
    with cpu.cores_awake():  # as train.py's loop runs (minitorch_gx/cpu.py)
        return time_steps(step, args.warmup, args.steps)


def torch_step(args, images_host, labels_host):
    """(step, sync) of torchvision's resnext50_32x4d on the same batch, or
    None when torch or torchvision does not import."""
    try:
        import torch
        import torchvision
    except ImportError:
        return None
    dev = "cuda" if args.device == "gpu" else "cpu"
    if dev == "cuda":
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.benchmark = True
    model = torchvision.models.resnext50_32x4d().to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.from_numpy(normalize_reference(images_host, numpy, numpy.float32)).to(dev)
    labels = torch.from_numpy(labels_host).to(dev)
    lossf = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def step():
        opt.zero_grad()
        lossf(model(x), labels).backward()
        opt.step()

    return step, (torch.cuda.synchronize if dev == "cuda" else (lambda: None))


def bench_torch(args, images_host, labels_host):
    made = torch_step(args, images_host, labels_host)
    if made is None:
        return None
    step, sync = made
    return time_steps(step, args.warmup, args.steps, sync)


def _child_argv(args, mode):
    """This script run as PyTorch's own process, in ``mode`` (--torch_only, --torch_server)."""
    return [sys.executable, os.path.abspath(__file__), mode, "--device", args.device,
            "--batch", str(args.batch), "--image_size", str(args.image_size),
            "--steps", str(args.steps), "--warmup", str(args.warmup)] + (
        ["--tf32"] if args.tf32 else [])


def _child_env():
    """glibc's malloc left as it is in PyTorch's process, as its users have it."""
    return dict(os.environ, MINITORCH_GX_RETAIN_MEMORY="0")


def bench_torch_own_process(args):
    """bench_torch in a child process that leaves glibc's malloc as it is
    (MINITORCH_GX_RETAIN_MEMORY=0): the step times it reports, or None."""
    import json
    import subprocess
    done = subprocess.run(_child_argv(args, "--torch_only"), env=_child_env(),
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def serve_torch_steps(args, images_host, labels_host):
    """The child of --rounds: warm up, say "ready", then time --steps steps
    for every line read, answering each with their times (JSON)."""
    import json
    made = torch_step(args, images_host, labels_host)
    if made is None:
        sys.exit("torch or torchvision does not import")
    step, sync = made
    time_steps(step, args.warmup, 0, sync)
    print("ready", flush=True)
    for _ in sys.stdin:
        print(json.dumps(time_steps(step, 0, args.steps, sync)), flush=True)


def bench_alternating(args, images_host, labels_host):
    """--rounds: ours and PyTorch's own process in turn, --steps steps a
    round each, ABBA-ordered; (ours, theirs), each a list of the rounds'
    step times; theirs None (ours still every round) when PyTorch cannot run."""
    import json
    import subprocess
    child = subprocess.Popen(_child_argv(args, "--torch_server"), env=_child_env(),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready = child.stdout.readline().strip() == "ready"  # (if not, it said why on stderr)
        step = ours_step(args, images_host, labels_host)
        with cpu.cores_awake():
            time_steps(step, args.warmup, 0)
        ours, theirs = [], []

        def ours_round():
            with cpu.cores_awake():
                ours.append(time_steps(step, 0, args.steps))

        def theirs_round():
            if ready:
                child.stdin.write("go\n")
                child.stdin.flush()
                theirs.append(json.loads(child.stdout.readline()))

        for r in range(args.rounds):
            for run in ((ours_round, theirs_round) if r % 2 == 0 else
                        (theirs_round, ours_round)):
                run()
        return ours, (theirs if ready else None)
    finally:
        child.stdin.close()
        child.wait()


def report(name, times, batch):
    rate = batch / statistics.median(times)
    print(f"{name:32} {rate:8.2f} img/s  (step {statistics.median(times) * 1000:.0f} ms; "
          f"all steps ms: {[round(t * 1000) for t in times]})")
    return rate


def cpu_line():
    """The CPU and NumPy's BLAS kernels, which the CPU figures depend on
    (OpenBLAS's AVX2 kernels ran large GEMMs at half the speed of its
    AVX-512 ones here: ``minitorch_gx/cpu.py``)."""
    model = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n")[0]
        fields = {k.strip(): v.strip() for k, _, v in
                  (line.partition(":") for line in first.splitlines())}
        model = f"{fields['model name']} (family {fields['cpu family']})"
    except (OSError, KeyError):
        pass
    forced = os.environ.get("OPENBLAS_CORETYPE")
    return (f"cpu: {model}, {os.cpu_count()} cores; NumPy's OpenBLAS kernels: "
            f"{cpu.blas_core() or 'none (another BLAS)'}"
            + (f" (OPENBLAS_CORETYPE={forced} in the environment)" if forced else ""))


def report_alternating(args, x, labels):
    print(f"{args.arch} training step, cpu, batch {args.batch}, {args.image_size}x"
          f"{args.image_size}, float32, {args.rounds} rounds of {args.steps} steps each, "
          f"ours and PyTorch's own process in turn, after {args.warmup} warm-up")
    print(cpu_line())
    ours, theirs = bench_alternating(args, x, labels)
    ours_rate = report("minitorch_gx:", [t for r in ours for t in r], args.batch)
    if theirs is None:
        print("PyTorch: not measured (torch/torchvision not importable)")
        return
    own_rate = report("PyTorch (own process):", [t for r in theirs for t in r], args.batch)
    faster = sum(statistics.median(a) < statistics.median(b) for a, b in zip(ours, theirs))
    print(f"ratio minitorch_gx / PyTorch: {ours_rate / own_rate:.2f} (PyTorch as its users run "
          f"it); ours faster in {faster} of {args.rounds} rounds (round medians)")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--arch", default="resnext50_32x4d")
    p.add_argument("--no_torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--tf32", action="store_true", help="GPU: TF32 GEMMs (and cuDNN) on both sides")
    p.add_argument("--rounds", type=int, default=1,
                   help="CPU: alternate ours and PyTorch's own process for this many rounds")
    p.add_argument("--torch_only", action="store_true", help=argparse.SUPPRESS)  # the child
    p.add_argument("--torch_server", action="store_true", help=argparse.SUPPRESS)  # --rounds'
    args = p.parse_args()
    if args.device == "gpu" and not backend.gpu_available():
        sys.exit("error: --device gpu but no usable CUDA device (or CuPy)")
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        sys.exit("error: --rounds and --steps must be at least 1, --warmup at least 0")
    if args.rounds > 1 and (args.device != "cpu" or args.no_torch
                            or args.arch != "resnext50_32x4d"):
        sys.exit("error: --rounds alternates with PyTorch's resnext50_32x4d on the CPU: "
                 "it needs --device cpu, the default --arch and no --no_torch")
    x, labels = random_batch(args.batch, args.image_size)
    if args.torch_only:
        import json
        print(json.dumps(bench_torch(args, x, labels)))
        return
    if args.torch_server:
        return serve_torch_steps(args, x, labels)
    if args.rounds > 1:
        return report_alternating(args, x, labels)
    print(f"{args.arch} training step, {args.device}, batch {args.batch}, "
          f"{args.image_size}x{args.image_size}, {'TF32' if args.tf32 else 'float32'}, median of "
          f"{args.steps} steps after {args.warmup} warm-up")
    if args.device == "cpu":
        print(cpu_line())
    compare = not args.no_torch and args.arch == "resnext50_32x4d"
    own = bench_torch_own_process(args) if compare and args.device == "cpu" else None
    ours_rate = report("minitorch_gx:", bench_ours(args, x, labels), args.batch)
    theirs = bench_torch(args, x, labels) if compare else None
    if theirs is None:
        print("PyTorch: not measured (torch/torchvision not importable, --no_torch, "
              "or an --arch torchvision lacks)")
        return
    if own is not None:
        own_rate = report("PyTorch (own process):", own, args.batch)
    same_name = "PyTorch (this process):" if args.device == "cpu" else "PyTorch:"
    torch_rate = report(same_name, theirs, args.batch)
    if own is not None:
        print(f"ratio minitorch_gx / PyTorch: {ours_rate / own_rate:.2f} (PyTorch as its users run "
              f"it); {ours_rate / torch_rate:.2f} (PyTorch with memory retained as ours)")
    else:
        print(f"ratio minitorch_gx / PyTorch: {ours_rate / torch_rate:.2f}")


if __name__ == "__main__":
    main()
