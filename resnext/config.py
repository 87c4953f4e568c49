"""Command-line flags of train.py and eval.py, named as in the original
MindSpore ResNeXt code, with the recipe's defaults (docs/RECIPE.md).

When no --data_path is given, train.py runs the embedded demo: a small
generated dataset and settings sized to finish in minutes on a CPU. Any flag
given explicitly still wins.
"""
import argparse
import copy
import os

from minitorch_gx import cpu

from .runtime import UserError

RECIPE = dict(arch="resnext50_32x4d", per_batch_size=128, lr=0.4, max_epoch=150,
              warmup_epochs=1, image_size=224, ckpt_interval=5, zero_init_residual=True,
              min_crop_scale=0.08)
# The demo: a reduced-width ResNeXt on 48x48 crops of the generated shapes,
# sized to finish in about 5 minutes on 2 CPU cores. Milder crops (the shape
# stays in view) and residual BNs starting at 1 make a run this short learn
# visibly faster (measured here: 28% top-1 after 15 epochs with the recipe's
# crops, 46% with these).
DEMO = dict(arch="resnext_mini", per_batch_size=32, lr=0.05, max_epoch=20,
            warmup_epochs=1, image_size=48, ckpt_interval=5, zero_init_residual=False,
            min_crop_scale=0.25)
DEFAULT_OUTPUT = "outputs"


def str2bool(value):
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0/1 or true/false, got {value!r}")


def device_flag(value):
    v = str(value).strip().lower()
    if v in ("gpu", "cuda"):
        return "GPU"
    if v == "cpu":
        return "CPU"
    raise argparse.ArgumentTypeError(f"--device_target must be GPU or CPU, got {value!r}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` shows every flag's default: argparse's value where it is
    fixed, the help text's own words where it depends on the recipe or the
    demo (those flags default to None and are filled by ``fill_defaults``)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS):
            return text
        value = action.default
        if isinstance(value, bool):
            value = "off" if action.nargs == 0 else int(value)  # store_true, or a 0/1 flag
        return f"{text} (default: {value})"


def _common(p, train):
    """The flags train.py and eval.py share; ``train`` picks the wording of
    the defaults that differ."""
    p.add_argument("--device_target", type=device_flag, default=None,
                   help="GPU or CPU (default: GPU when a usable CUDA device is present)")
    p.add_argument("--run_distribute", type=str2bool, default=False,
                   help="1 under mpirun: one process per GPU, gradients averaged")
    p.add_argument("--data_path", default=None,
                   help="ImageNet-layout folder (<wnid>/*.JPEG); default: the embedded demo data")
    p.add_argument("--per_batch_size", type=int, default=None,
                   help="batch size per process (default: 128; the demo 32)" if train else
                   "batch size per process (default: 128)")
    p.add_argument("--image_size", type=int, default=None,
                   help="crop size in pixels (default: 224; the demo 48)" if train else
                   "crop size in pixels (default: the size the checkpoint was trained at, "
                   "else 224)")
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="data-loading worker processes (0: decode in the main process; "
                        "default: one per core, at most 8)")
    p.add_argument("--arch", default=None, choices=["resnext50_32x4d", "resnext_mini"],
                   help="model; resnext_mini is the demo's reduced width (default: "
                        + ("resnext50_32x4d; the demo resnext_mini)" if train else
                           "the checkpoint's own, else resnext50_32x4d)"))
    p.add_argument("--seed", type=int, default=1,
                   help="seed of the initial weights and of the data order and augmentation"
                   if train else "seed of the data loader (evaluation itself is not random)")
    p.add_argument("--dist_timeout", type=float, default=600.0, metavar="SECONDS",
                   help="under mpirun: a collective (gradient allreduce, broadcast, barrier) "
                        "or the job's setup that takes longer ends the job with one line "
                        "naming the rank and the collective")


def train_parser():
    p = argparse.ArgumentParser(
        description="Train ResNeXt50_32x4d (the original's flags and defaults).",
        formatter_class=HelpFormatter)
    _common(p, train=True)
    p.add_argument("--output_path", default=DEFAULT_OUTPUT, help="where run folders are made")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate, reached after the warm-up (default: 0.4; the "
                        "demo 0.05)")
    p.add_argument("--max_epoch", type=int, default=None,
                   help="epochs (default: 150; the demo 20)")
    p.add_argument("--warmup_epochs", type=float, default=None,
                   help="linear warm-up epochs, then cosine decay (default: 1)")
    p.add_argument("--weight_decay", type=float, default=1e-4,
                   help="L2 weight decay of the conv and fc weights (BN and biases get none)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--label_smooth_factor", type=float, default=0.1,
                   help="label smoothing of the cross-entropy loss (0: none)")
    p.add_argument("--ckpt_interval", type=int, default=None,
                   help="save a checkpoint every N epochs, and after the last (default: 5)")
    p.add_argument("--ckpt_save_max", type=int, default=5, help="keep the newest N checkpoints")
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue a run from this checkpoint, run folder or ckpt_0/ (weights, "
                        "optimizer, epoch, step, settings; default: a new run)")
    p.add_argument("--checkpoint_file_path", default=None, metavar="WEIGHTS",
                   help="warm start from weights (.ckpt, .npz or .pth); optimizer starts fresh "
                        "(default: none, random initial weights)")
    p.add_argument("--synthetic", action="store_true",
                   help="random data made on the device: measures training throughput alone")
    p.add_argument("--steps_per_epoch", type=int, default=None,
                   help="cap the steps of an epoch (default: the whole shard; synthetic: 50)")
    p.add_argument("--zero_init_residual", type=str2bool, default=None,
                   help="start the last BN gamma of each block at 0 (the original does; "
                        "default 1, and 0 in the demo)")
    p.add_argument("--min_crop_scale", type=float, default=None,
                   help="smallest area fraction of the random resized crop (default: 0.08; "
                        "the demo 0.25)")
    p.add_argument("--log_interval", type=int, default=20,
                   help="steps between log lines (and, on a GPU, between reads of the loss)")
    p.add_argument("--val_data_path", default=None, metavar="DIR",
                   help="validation folder (ImageNet layout, the training data's classes): "
                        "top-1/top-5 and loss on it during training, as eval.py scores them, "
                        "and the best top-1 kept as ckpt_0/best.ckpt (default: none)")
    p.add_argument("--eval_interval", type=int, default=None, metavar="N",
                   help="validate every N epochs, and after the last (default: 1 with "
                        "--val_data_path)")
    p.add_argument("--tf32", action="store_true",
                   help="on a GPU, let cuBLAS multiply float32 in TF32 (faster, less exact); "
                        "the recipe and the default are full fp32")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write loss, learning rate, images/s and validation scores to "
                        "<run dir>/tensorboard/ (needs pip install -e \".[tensorboard]\")")
    return p


def eval_parser():
    p = argparse.ArgumentParser(description="Evaluate ResNeXt checkpoints (top-1 / top-5).",
                                formatter_class=HelpFormatter)
    _common(p, train=False)
    p.add_argument("--checkpoint_file_path", default=None,
                   help="a checkpoint or weights file, or a folder whose checkpoints are all "
                        "evaluated newest epoch first (default: the newest demo run)")
    p.add_argument("--eval_resize", choices=["square", "shorter"], default="square",
                   help="square: the original's 256x256 resize; shorter: torchvision's "
                        "shorter side to 256 (use it for torchvision's weights)")
    p.add_argument("--output_path", default=DEFAULT_OUTPUT,
                   help="where to look for the newest run when no checkpoint is given")
    return p


def fill_defaults(args):
    """Recipe defaults with real data, demo defaults without; explicit flags win."""
    table = DEMO if args.data_path is None and not getattr(args, "synthetic", False) else RECIPE
    for key, value in table.items():
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, value)
    args.demo = args.data_path is None and not getattr(args, "synthetic", False)
    if getattr(args, "val_data_path", None) is not None and args.eval_interval is None:
        args.eval_interval = 1
    return args


# The settings that shape a run: --resume takes them from the checkpoint.
RESUMED_SETTINGS = ("arch", "per_batch_size", "image_size", "lr", "warmup_epochs", "max_epoch",
                    "seed", "min_crop_scale", "zero_init_residual", "weight_decay", "momentum",
                    "label_smooth_factor", "steps_per_epoch", "synthetic")

# Both architectures halve the image five times (stem conv, max pool, layer2,
# layer3, layer4): below 32 pixels the last stages see one pixel of real data
# and their strides do nothing; the recipe's network is not being trained.
MIN_IMAGE_SIZE = 32


def explicit_flags(parser, argv):
    """The destinations of the flags given on the command line (not defaulted)."""
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv)))


def _check(problems, ok, flag, value, must):
    if value is not None and not ok(value):
        problems.append(f"{flag} {value}: must be {must}")


def _common_problems(args):
    """What is wrong with the flags train.py and eval.py share (``_common``)."""
    p = []
    _check(p, lambda v: v >= 1, "--per_batch_size", args.per_batch_size, "at least 1")
    _check(p, lambda v: v >= MIN_IMAGE_SIZE, "--image_size", args.image_size,
           f"at least {MIN_IMAGE_SIZE}, the smallest size the networks support (they halve "
           f"the image five times)")
    _check(p, lambda v: v >= 0, "--num_workers", args.num_workers, "0 or more")
    _check(p, lambda v: v > 0, "--dist_timeout", args.dist_timeout, "greater than 0 (seconds)")
    if args.data_path is not None and not os.path.isdir(args.data_path):
        p.append(f"--data_path {args.data_path}: no such folder")
    path = args.checkpoint_file_path
    if path is not None and not os.path.exists(path):
        p.append(f"--checkpoint_file_path {path}: no such file or folder")
    # the NumPy path's settings from the environment (minitorch_gx/cpu.py)
    for setting in (cpu.threads, cpu.keep_awake_enabled):
        try:
            setting()
        except ValueError as e:
            p.append(str(e))
    return p


def validate_train_args(args):
    """Every flag checked before any work starts: one UserError listing what is wrong."""
    p = _common_problems(args)
    _check(p, lambda v: v > 0, "--lr", args.lr, "greater than 0")
    _check(p, lambda v: v >= 1, "--max_epoch", args.max_epoch, "at least 1")
    _check(p, lambda v: v >= 0, "--warmup_epochs", args.warmup_epochs, "0 or more")
    _check(p, lambda v: v >= 0, "--weight_decay", args.weight_decay, "0 or more")
    _check(p, lambda v: 0 <= v < 1, "--momentum", args.momentum, "in [0, 1)")
    _check(p, lambda v: 0 <= v < 1, "--label_smooth_factor", args.label_smooth_factor,
           "in [0, 1)")
    _check(p, lambda v: v >= 1, "--ckpt_interval", args.ckpt_interval, "at least 1 (epochs)")
    _check(p, lambda v: v >= 1, "--ckpt_save_max", args.ckpt_save_max,
           "at least 1 (checkpoints kept)")
    _check(p, lambda v: v >= 1, "--log_interval", args.log_interval, "at least 1 (steps)")
    _check(p, lambda v: v >= 1, "--steps_per_epoch", args.steps_per_epoch, "at least 1")
    _check(p, lambda v: 0 < v <= 1, "--min_crop_scale", args.min_crop_scale, "in (0, 1]")
    _check(p, lambda v: v >= 1, "--eval_interval", args.eval_interval, "at least 1 (epochs)")
    if args.eval_interval is not None and args.val_data_path is None:
        p.append(f"--eval_interval {args.eval_interval}: needs --val_data_path")
    if args.val_data_path is not None and not os.path.isdir(args.val_data_path):
        p.append(f"--val_data_path {args.val_data_path}: no such folder")
    _check_output_path(p, args.output_path)
    if args.resume is not None and not os.path.exists(args.resume):
        p.append(f"--resume {args.resume}: no such file or folder")
    if p:
        raise UserError("; ".join(p))


def validate_eval_args(args):
    """The same for eval.py: one UserError before any work."""
    p = _common_problems(args)
    if p:
        raise UserError("; ".join(p))


def _check_output_path(problems, path):
    """A folder we can create run folders in (it may not exist yet)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        problems.append(f"--output_path {path}: {probe} is a file, not a folder")
    elif not os.access(probe, os.W_OK | os.X_OK):
        problems.append(f"--output_path {path}: {probe} is not writable")
