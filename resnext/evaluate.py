"""The evaluation of eval.py: top-1 and top-5 accuracy of one checkpoint, or of
every checkpoint in a folder (newest epoch first), with the original's log
lines. Under mpirun each rank scores its own shard and the counts are summed.
"""
import os
import time

import numpy

import minitorch_gx as mt
from minitorch_gx import backend
from minitorch_gx.functional import topk_correct

from . import checkpoint as ckpt
from .config import DEFAULT_OUTPUT, eval_parser
from .dataset import ImageFolder
from .demo_data import ensure_demo_dataset
from .loader import IGNORE, Loader
from .model import build_model
from .runtime import UserError, choose_device, process_group, setup_logger
from .transforms import normalize


def newest_run_checkpoints(output_path=DEFAULT_OUTPUT):
    """The ckpt_0 folder of the newest run under ``output_path`` (run folder
    names sort by time)."""
    runs = []
    if os.path.isdir(output_path):
        runs = sorted(d for d in os.listdir(output_path)
                      if os.path.isdir(os.path.join(output_path, d, "ckpt_0")))
    if not runs:
        raise UserError(f"no training run found under {output_path!r}: run train.py first or "
                        "pass --checkpoint_file_path")
    return os.path.join(output_path, runs[-1], "ckpt_0")


def checkpoints_to_evaluate(path):
    if os.path.isdir(path):
        found = [p for _, _, p in ckpt.list_checkpoints(path)]
        if not found:
            raise UserError(f"no checkpoints ({{rank}}-{{epoch}}_{{step}}.ckpt) in folder {path}")
        return found
    if not os.path.exists(path):
        raise UserError(f"checkpoint not found: {path}")
    return [path]


def model_for(path, state, meta, args, num_classes):
    """Build the architecture a checkpoint was trained with (its metadata says;
    plain weight files are taken as --arch, default resnext50_32x4d)."""
    arch = args.arch or meta.get("arch") or "resnext50_32x4d"
    fc = state.get("fc.weight")
    classes = fc.shape[0] if fc is not None else num_classes
    if classes != num_classes:
        raise UserError(f"{path} predicts {classes} classes but the data has {num_classes}")
    model = build_model(arch, classes)
    try:
        model.load_state_dict(state)
    except KeyError as e:
        raise UserError(f"{path}: {e} (is --arch {arch} right?)") from None
    return model


def evaluate(model, loader, xp, group):
    """Return (top1_correct, top5_correct, total, images_per_second) summed
    over all ranks."""
    model.eval()
    top1 = top5 = total = 0
    start = time.perf_counter()
    with mt.no_grad():
        for images, labels in loader:
            keep = labels != IGNORE  # rows of unreadable images are not scored
            if not keep.all():
                images, labels = images[keep], labels[keep]
                if len(labels) == 0:
                    continue
            x = mt.Tensor(normalize(xp.asarray(images), xp, numpy.float32))
            logits = model(x)
            labels = xp.asarray(labels)
            top1 += topk_correct(logits, labels, 1)
            top5 += topk_correct(logits, labels, min(5, logits.shape[1]))
            total += len(labels)
    seconds = time.perf_counter() - start
    counts = group.allreduce_sum(numpy.array([top1, top5, total], dtype=numpy.int64))
    rate = group.allreduce_sum(total / max(seconds, 1e-9))
    return int(counts[0]), int(counts[1]), int(counts[2]), rate


def main(argv=None):
    args = eval_parser().parse_args(argv)
    args.per_batch_size = args.per_batch_size or 128
    device = choose_device(args.device_target)
    group = process_group(args.run_distribute, device)
    log = setup_logger(None, group.rank)
    xp = backend.cupy if device == "gpu" else numpy

    target = args.checkpoint_file_path or newest_run_checkpoints(args.output_path)
    paths = checkpoints_to_evaluate(target)

    root = args.data_path
    if root is None:
        root = os.path.join(ensure_demo_dataset(), "val")
    dataset = ImageFolder(root)
    results = []
    for path in paths:
        if path.endswith(".ckpt"):
            state, _, meta = ckpt.load_checkpoint(path)
        else:
            state, meta = ckpt.load_model_weights(path), {}
        model = model_for(path, state, meta, args, len(dataset.classes))
        size = args.image_size or meta.get("image_size", 224)  # a run's own size by default
        if device == "gpu":
            model.to("gpu")
        loader = Loader(dataset, batch_size=args.per_batch_size, train=False, image_size=size,
                        num_workers=args.num_workers, seed=args.seed, rank=group.rank,
                        world_size=group.world_size, eval_resize=args.eval_resize)
        top1, top5, total, rate = evaluate(model, loader, xp, group)
        log.info(f"evaluating {path}")
        log.info(f"Inference Performance: {rate:.2f} img/sec")
        log.info(f"top1_correct={top1}, tot={total}, acc={100.0 * top1 / total:.2f}%(TOP1)")
        log.info(f"top5_correct={top5}, tot={total}, acc={100.0 * top5 / total:.2f}%(TOP5)")
        if loader.corrupt_count:
            log.warning(f"{loader.corrupt_count} unreadable image(s) skipped on rank "
                        f"{group.rank}: {', '.join(loader.corrupt_paths[:3])}")
        results.append((path, top1 / total, top5 / total))
    if group.rank == 0:
        best = max(results, key=lambda r: r[1])
        print(f"summary: {len(results)} checkpoint(s) on {total} images of {root}; best top-1 "
              f"{100 * best[1]:.2f}% top-5 {100 * best[2]:.2f}% ({os.path.basename(best[0])})")
    return 0
