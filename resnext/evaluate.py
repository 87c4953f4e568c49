"""The evaluation of eval.py: top-1 and top-5 accuracy of one checkpoint, or of
every checkpoint in a folder (newest epoch first), with the original's log
lines. Under mpirun each rank scores its own shard and the counts are summed.

What is not trusted: a checkpoint (or weights file) holding a NaN or an
infinity is refused before it is scored; a row of logits with a non-finite
value is scored wrong and counted (``N of M rows had non-finite logits``);
ties between logits go by class index (``topk_correct``), so a constant model
scores chance. In a folder, a checkpoint that cannot be read, is refused or
does not fit is reported in one line on stderr and skipped; the others are
scored and the exit status is 1. Each unreadable image is named once in the
log, with the reason; a data folder with no readable image is an error.
"""
import collections
import contextlib
import os
import sys
import time

import numpy

import minitorch_gx as mt
from minitorch_gx import backend, cpu
from minitorch_gx.functional import cross_entropy, topk_correct

from . import checkpoint as ckpt
from .config import DEFAULT_OUTPUT, eval_parser, validate_eval_args
from .convert import ConvertError
from .dataset import DataError, ImageFolder
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


def load_scorable(path, args, num_classes):
    """(model, meta) of a checkpoint or weights file, refusing one whose arrays
    are not all finite. Raises CheckpointError, ConvertError or UserError with
    one line naming the file."""
    if path.endswith(".ckpt"):
        state, _, meta = ckpt.load_checkpoint(path)
    else:
        state, meta = ckpt.load_model_weights(path), {}
    bad = ckpt.nonfinite_arrays(state)
    if bad:
        raise ckpt.CheckpointError(f"{path}: {len(bad)} of {len(state)} arrays hold NaN or inf "
                                   f"values (e.g. {bad[0]!r}): refusing to score it")
    return model_for(path, state, meta, args, num_classes), meta


Scores = collections.namedtuple("Scores", "top1 top5 total rate nonfinite loss")
Scores.__doc__ = """Summed over all ranks: top-1 and top-5 correct, images scored,
images per second, rows whose logits were not all finite (scored wrong), and
the mean cross-entropy over the images scored (no label smoothing; NaN when a
row is not finite)."""


def evaluate(model, loader, xp, group):
    """Return ``Scores(top1, top5, total, rate, nonfinite, loss)`` over all ranks.

    A row with a NaN or infinite logit is scored wrong (``topk_correct``) and
    counted in ``nonfinite``; rows of unreadable images are not scored."""
    model.eval()
    top1 = top5 = total = nonfinite = 0
    loss_sum = 0.0
    start = time.perf_counter()
    # overflow to inf / NaN is reported as the count of non-finite rows, not as warnings
    # on the CPU, the cores kept from halting between batches' bursts (minitorch_gx/cpu.py)
    awake = cpu.cores_awake() if xp is numpy else contextlib.nullcontext()
    with mt.no_grad(), numpy.errstate(over="ignore", invalid="ignore"), awake:
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
            nonfinite += int((~xp.isfinite(logits.data).all(axis=1)).sum())
            loss_sum += float(cross_entropy(logits, labels, reduction="sum").data)
            total += len(labels)
    seconds = time.perf_counter() - start
    counts = group.allreduce_sum(numpy.array([top1, top5, total, nonfinite], dtype=numpy.int64))
    rate = group.allreduce_sum(total / max(seconds, 1e-9))
    loss = group.allreduce_sum(loss_sum) / max(int(counts[2]), 1)
    return Scores(int(counts[0]), int(counts[1]), int(counts[2]), rate, int(counts[3]), loss)


def main(argv=None):
    args = eval_parser().parse_args(argv)
    args.per_batch_size = 128 if args.per_batch_size is None else args.per_batch_size
    validate_eval_args(args)
    device = choose_device(args.device_target)
    group = process_group(args.run_distribute, device, args.dist_timeout)
    log = setup_logger(None, group.rank)
    xp = backend.cupy if device == "gpu" else numpy

    target = args.checkpoint_file_path or newest_run_checkpoints(args.output_path)
    paths = checkpoints_to_evaluate(target)

    root = args.data_path
    if root is None:
        root = os.path.join(ensure_demo_dataset(), "val")
    dataset = ImageFolder(root)
    one_file = not os.path.isdir(target)
    results, failed, named = [], [], set()
    for path in paths:
        try:
            model, meta = load_scorable(path, args, len(dataset.classes))
        except (ckpt.CheckpointError, ConvertError, UserError) as e:
            if one_file:
                raise  # main_guard: one line, exit status 1
            failed.append(path)  # every rank reads the same file and skips it alike
            if group.rank == 0:
                print(f"error: {e}; skipped", file=sys.stderr)
            continue
        size = args.image_size or meta.get("image_size", 224)  # a run's own size by default
        if device == "gpu":
            model.to("gpu")
        loader = Loader(dataset, batch_size=args.per_batch_size, train=False, image_size=size,
                        num_workers=args.num_workers, seed=args.seed, rank=group.rank,
                        world_size=group.world_size, eval_resize=args.eval_resize,
                        warn_unreadable=False)  # named in this log below, once
        scores = evaluate(model, loader, xp, group)
        loader.close()
        if scores.total == 0:
            example = next(iter(loader.unreadable.items()), None)
            raise DataError(f"no image in {root} could be read: all {len(dataset.samples)} files "
                            f"are unreadable" + (f", e.g. {example[0]} ({example[1]})"
                                                 if example else ""))
        top1, top5, total = scores.top1, scores.top5, scores.total
        log.info(f"evaluating {path}")
        log.info(f"Inference Performance: {scores.rate:.2f} img/sec")
        log.info(f"top1_correct={top1}, tot={total}, acc={100.0 * top1 / total:.2f}%(TOP1)")
        log.info(f"top5_correct={top5}, tot={total}, acc={100.0 * top5 / total:.2f}%(TOP5)")
        log.info(f"loss={scores.loss:.4f} (cross-entropy, mean over {total} images)")
        if scores.nonfinite:
            log.warning(f"{scores.nonfinite} of {total} rows had non-finite logits and were "
                        f"scored wrong")
        for image, reason in loader.unreadable.items():
            if image not in named:
                named.add(image)
                log.warning(f"unreadable image {image} ({reason}): not scored")
        if loader.unreadable:
            log.warning(f"{len(loader.unreadable)} unreadable image(s) skipped on rank "
                        f"{group.rank}")
        results.append((path, top1 / total, top5 / total, total))
    if group.rank == 0:
        not_scored = (f"; {len(failed)} checkpoint(s) could not be scored (see the errors "
                      f"above)" if failed else "")
        if results:
            best = max(results, key=lambda r: r[1])
            print(f"summary: {len(results)} checkpoint(s) on {results[-1][3]} images of {root}; "
                  f"best top-1 {100 * best[1]:.2f}% top-5 {100 * best[2]:.2f}% "
                  f"({os.path.basename(best[0])}){not_scored}")
        else:
            print(f"summary: no checkpoint could be scored: {len(failed)} checkpoint(s) could "
                  f"not be read or were refused (see the errors above)")
    return 1 if failed else 0
