"""The training loop of train.py: data, model, SGD with the recipe's schedule,
checkpoints, logs, resume and warm start, on one process or under mpirun.

One step:  uint8 batch -> device -> normalise -> forward -> label-smoothed
cross-entropy -> backward (gradients averaged across ranks as they appear)
-> SGD step with the learning rate of this step.
"""
import json
import math
import os
import sys
import time

import numpy

import minitorch_gx as mt
from minitorch_gx import backend, distributed
from minitorch_gx.functional import cross_entropy
from minitorch_gx.optim import SGD, WarmupCosineLR

from . import checkpoint as ckpt
from .config import fill_defaults, train_parser
from .dataset import ImageFolder
from .demo_data import ensure_demo_dataset
from .loader import Loader
from .model import build_model
from .runtime import UserError, choose_device, process_group, run_folder_name, setup_logger
from .transforms import normalize

SYNTHETIC_CLASSES = 1000
SYNTHETIC_STEPS = 50


def param_groups(model, weight_decay):
    """Weight decay on conv and fc weights only: BN gamma/beta and biases (the
    1-D parameters) get none, as in the recipe."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class SyntheticBatches:
    """The same random uint8 batch, made once on the device, every step."""

    def __init__(self, batch_size, image_size, steps, xp, seed):
        rs = xp.random.RandomState(seed)
        self.images = rs.randint(0, 256, (batch_size, image_size, image_size, 3)).astype(xp.uint8)
        self.labels = rs.randint(0, SYNTHETIC_CLASSES, batch_size).astype(xp.int64)
        self.steps, self.corrupt_count, self.start = steps, 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.start = start_batch

    def __len__(self):
        return self.steps

    def __iter__(self):
        for _ in range(self.start, self.steps):
            yield self.images, self.labels


class Run:
    """Everything one training run holds; ``fit()`` trains it."""

    def __init__(self, args):
        self.args = args = fill_defaults(args)
        self.device = choose_device(args.device_target)
        self.group = process_group(args.run_distribute, self.device)
        self.rank, self.world = self.group.rank, self.group.world_size
        self.xp = backend.cupy if self.device == "gpu" else numpy
        self._make_data()
        self._make_model()
        self._make_run_folder()

    # -- setup ---------------------------------------------------------------
    def _make_data(self):
        a = self.args
        if a.synthetic:
            steps = a.steps_per_epoch or SYNTHETIC_STEPS
            self.loader = SyntheticBatches(a.per_batch_size, a.image_size, steps, self.xp, a.seed)
            self.num_classes = SYNTHETIC_CLASSES
            return
        root = a.data_path
        if root is None:
            root = os.path.join(ensure_demo_dataset(), "train")
        dataset = ImageFolder(root)
        self.num_classes = len(dataset.classes)
        self.loader = Loader(dataset, batch_size=a.per_batch_size, train=True,
                             image_size=a.image_size, num_workers=a.num_workers, seed=a.seed,
                             rank=self.rank, world_size=self.world,
                             crop_scale=(a.min_crop_scale, 1.0))
        if len(self.loader) == 0:
            raise UserError(f"{root}: {len(dataset.samples)} images are too few for one batch of "
                            f"{a.per_batch_size} per process on {self.world} process(es)")

    def _make_model(self):
        a = self.args
        self.model = build_model(a.arch, self.num_classes, a.zero_init_residual, seed=a.seed)
        if a.checkpoint_file_path:   # warm start: weights only
            state = ckpt.load_model_weights(a.checkpoint_file_path)
            try:
                self.model.load_state_dict(state)
            except KeyError as e:
                raise UserError(f"{a.checkpoint_file_path}: {e}") from None
        if self.device == "gpu":
            self.model.to("gpu")
        if self.world > 1:
            distributed.broadcast_parameters(self.model)
        self.model.train()
        self.optimizer = SGD(param_groups(self.model, a.weight_decay), lr=a.lr,
                             momentum=a.momentum)
        self.steps_per_epoch = min(len(self.loader), a.steps_per_epoch or len(self.loader))
        self.scheduler = WarmupCosineLR(self.optimizer, self.steps_per_epoch, a.warmup_epochs,
                                        a.max_epoch)
        self.reducer = None
        if self.world > 1:
            self.reducer = distributed.GradientAllreducer(list(self.model.parameters()))
        self.start_epoch, self.start_batch = 0, 0
        self._batches_done = 0
        if a.resume:
            self._resume(a.resume)

    def _resume(self, path):
        model_state, optim_state, meta = ckpt.load_checkpoint(path)
        try:
            self.model.load_state_dict(model_state)
        except KeyError as e:
            raise UserError(f"{path}: {e}") from None
        if optim_state is None:
            raise UserError(f"{path} holds no optimizer state: use --checkpoint_file_path "
                            "to warm-start from weights")
        self.optimizer.load_state_dict(optim_state)
        self.scheduler.load_state_dict(meta["scheduler"])
        self.start_epoch, self.start_batch = meta["epoch_index"], meta["batches_done"]
        if self.start_batch >= self.steps_per_epoch:
            self.start_epoch, self.start_batch = self.start_epoch + 1, 0

    def _make_run_folder(self):
        a = self.args
        name = self.group.broadcast_object(run_folder_name() if self.rank == 0 else None)
        self.run_dir = os.path.join(a.output_path, name)
        self.ckpt_dir = os.path.join(self.run_dir, "ckpt_0")
        if self.rank == 0:
            os.makedirs(self.ckpt_dir, exist_ok=True)
        self.group.barrier()
        self.log = setup_logger(self.run_dir, self.rank)
        self.log.info(f"device {self.device}, {self.world} process(es), arch {a.arch}, "
                      f"{self.num_classes} classes, batch {a.per_batch_size} per process, "
                      f"image {a.image_size}, {self.steps_per_epoch} steps per epoch"
                      + (" (demo data)" if a.demo else ""))

    # -- saving ----------------------------------------------------------------
    def save(self, epoch_index, batches_done):
        """Rank 0 writes ``{rank}-{epoch}_{step}.ckpt`` (epoch 1-based)."""
        if self.rank != 0:
            return None
        meta = {"epoch_index": epoch_index, "batches_done": batches_done,
                "global_step": self.scheduler.last_step + 1, "scheduler": self.scheduler.state_dict(),
                "arch": self.args.arch, "num_classes": self.num_classes,
                "image_size": self.args.image_size, "demo": self.args.demo,
                "settings": {k: v for k, v in vars(self.args).items()
                             if isinstance(v, (int, float, str, bool, type(None)))}}
        path = os.path.join(self.ckpt_dir, ckpt.checkpoint_name(self.rank, epoch_index + 1,
                                                                batches_done))
        ckpt.save_checkpoint(path, self.model, self.optimizer, meta)
        ckpt.prune_checkpoints(self.ckpt_dir, self.args.ckpt_save_max)
        self.log.info(f"saved checkpoint {path}")
        return path

    # -- training ----------------------------------------------------------------
    def step(self, images, labels):
        xp = self.xp
        x = mt.Tensor(normalize(xp.asarray(images), xp, numpy.float32))
        lr = self.scheduler.step()
        self.optimizer.zero_grad()
        loss = cross_entropy(self.model(x), xp.asarray(labels),
                             label_smoothing=self.args.label_smooth_factor)
        loss.backward()
        if self.reducer is not None:
            self.reducer.synchronize()
        self.optimizer.step()
        return float(loss.data), lr

    def fit(self):
        a = self.args
        epoch_index = self.start_epoch
        try:
            for epoch_index in range(self.start_epoch, a.max_epoch):
                if not self._epoch(epoch_index):
                    return 1
        except KeyboardInterrupt:
            self.log.info("interrupted: saving a checkpoint before exiting")
            self.save(epoch_index, self._batches_done)
            return 130
        self.log.info(f"training finished: checkpoints in {self.ckpt_dir}")
        return 0

    def _epoch(self, epoch_index):
        a, start = self.args, self.start_batch if epoch_index == self.start_epoch else 0
        self.loader.set_epoch(epoch_index, start_batch=start)
        self._batches_done = start
        progress = _Progress(self.steps_per_epoch - start, epoch_index, a.max_epoch, self.rank)
        losses, t0, seen = [], time.perf_counter(), 0
        for images, labels in self.loader:
            if self._batches_done >= self.steps_per_epoch:
                break
            loss, lr = self.step(images, labels)
            if not math.isfinite(loss):
                self.log.error(f"epoch: {epoch_index + 1} step: {self._batches_done + 1}, loss is "
                               f"{loss}: stopping; the last good checkpoint is kept in "
                               f"{self.ckpt_dir}")
                progress.close()
                return False
            self._batches_done += 1
            losses.append(loss)
            seen += len(labels)
            rate = seen * self.world / (time.perf_counter() - t0)
            progress.update(loss, lr, rate)
            if progress.plain and self._batches_done % a.log_interval == 0:
                self.log.info(f"epoch: {epoch_index + 1} step: {self._batches_done}/"
                              f"{self.steps_per_epoch}, loss {loss:.4f}, lr {lr:.6f}, "
                              f"{rate:.1f} img/s")
        progress.close()
        self._end_epoch(epoch_index, start, losses, time.perf_counter() - t0, seen)
        self.start_batch = 0
        return True

    def _end_epoch(self, epoch_index, start, losses, seconds, seen):
        a, steps = self.args, max(1, self._batches_done - start)
        rate = self.group.allreduce_sum(seen / seconds)   # total over ranks
        self.log.info(f"epoch: {epoch_index + 1} step: {self._batches_done}, loss is {losses[-1]}")
        self.log.info(f"epoch time: {seconds * 1000:.3f} ms, per step time: "
                      f"{seconds * 1000 / steps:.3f} ms")
        corrupt = getattr(self.loader, "corrupt_count", 0)
        if corrupt:
            self.log.warning(f"{corrupt} unreadable image(s) skipped so far")
        if self.rank == 0:
            record = {"epoch": epoch_index + 1, "global_step": self.scheduler.last_step + 1,
                      "loss_mean": float(numpy.mean(losses)), "loss_last": losses[-1],
                      "lr": self.optimizer.param_groups[0]["lr"], "img_per_sec": rate,
                      "epoch_time_s": seconds, "corrupt_images": corrupt}
            with open(os.path.join(self.ckpt_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        last = epoch_index + 1 == a.max_epoch
        if (epoch_index + 1) % a.ckpt_interval == 0 or last:
            self.save(epoch_index, self._batches_done)


class _Progress:
    """A tqdm bar on a terminal (rank 0); elsewhere nothing, and the caller logs
    plain lines."""

    def __init__(self, total, epoch_index, max_epoch, rank):
        self.plain = not sys.stderr.isatty()
        self.bar = None
        if not self.plain and rank == 0:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=f"epoch {epoch_index + 1}/{max_epoch}",
                            leave=False, dynamic_ncols=True)

    def update(self, loss, lr, rate):
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.5f}", img_s=f"{rate:.1f}")
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def main(argv=None):
    args = train_parser().parse_args(argv)
    run = Run(args)
    return run.fit()
