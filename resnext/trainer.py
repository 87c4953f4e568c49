"""The training loop of train.py: data, model, SGD with the recipe's schedule,
checkpoints, logs, resume and warm start, on one process or under mpirun.

One step:  uint8 batch -> device -> normalise -> forward -> label-smoothed
cross-entropy -> backward (gradients averaged across ranks as they appear)
-> SGD step with the learning rate of this step.

Stops are taken between steps and by all ranks together: a signal (see
``stops``) or a non-finite loss or gradient on any rank ends the run after
the same step everywhere. A non-finite step is not applied, and no
checkpoint with a non-finite array is ever written, so the newest checkpoint
on disk is always one that resumes. A step reads nothing back from the
device: its loss and flags are read every ``read_interval()`` steps (each step
on a CPU, each --log_interval on a GPU), where those decisions are taken.
"""
import contextlib
import json
import os
import sys
import time

import numpy

import minitorch_gx as mt
from minitorch_gx import backend, cpu, distributed
from minitorch_gx.cuda.prefetch import DevicePrefetcher
from minitorch_gx.functional import cross_entropy
from minitorch_gx.ops.loss import check_labels
from minitorch_gx.optim import SGD, WarmupCosineLR

from . import checkpoint as ckpt
from .config import RESUMED_SETTINGS, explicit_flags, fill_defaults, train_parser
from .config import validate_train_args
from .dataset import ImageFolder
from .evaluate import evaluate
from .demo_data import ensure_demo_dataset
from .loader import Loader
from .model import build_model
from .runtime import UserError, choose_device, make_run_folder, process_group, setup_logger
from .stops import StopSignals
from .transforms import normalize

SYNTHETIC_CLASSES = 1000
SYNTHETIC_STEPS = 50
BEST_NAME = "best.ckpt"  # beside the rotating checkpoints in ckpt_0/


def param_groups(model, weight_decay):
    """Weight decay on conv and fc weights only: BN gamma/beta and biases (the
    1-D parameters) get none, as in the recipe."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class SyntheticBatches:
    """The same random uint8 batch, made once on the device, every step (the
    labels stay on the host, where the loss checks them)."""

    def __init__(self, batch_size, image_size, steps, xp, seed):
        rs = xp.random.RandomState(seed)
        self.images = rs.randint(0, 256, (batch_size, image_size, image_size, 3)).astype(xp.uint8)
        self.labels = backend.to_numpy(rs.randint(0, SYNTHETIC_CLASSES, batch_size)
                                       .astype(xp.int64))
        self.steps, self.start = steps, 0
        self.unreadable = {}  # the loader's API: none here

    def set_epoch(self, epoch, start_batch=0):
        self.start = start_batch

    def __len__(self):
        return self.steps

    def __iter__(self):
        for _ in range(self.start, self.steps):
            yield self.images, self.labels


class Run:
    """Everything one training run holds; ``fit()`` trains it."""

    def __init__(self, args, explicit=()):
        self.resume_path = self.resumed = None
        if args.resume:
            self._take_settings_from_checkpoint(args, set(explicit))
        self.args = args = fill_defaults(args)
        validate_train_args(args)
        tensorboard_writer_class() if args.tensorboard else None  # a missing extra: one line now
        self.device = choose_device(args.device_target)
        if args.tf32 and self.device != "gpu":
            raise UserError("--tf32 is a cuBLAS setting for GPU runs; this run is on the CPU")
        if self.device == "gpu":
            backend.set_tf32(args.tf32)
        self.group = process_group(args.run_distribute, self.device, args.dist_timeout)
        self.rank, self.world = self.group.rank, self.group.world_size
        self.xp = backend.cupy if self.device == "gpu" else numpy
        self._make_data()
        self._make_model()
        self._make_run_folder()

    # -- setup ---------------------------------------------------------------
    def _take_settings_from_checkpoint(self, args, explicit):
        """--resume continues the run as it was set up: the settings that shape
        it come from the checkpoint; a flag given that contradicts one is an error."""
        self.resume_path = ckpt.resolve_resume_path(args.resume)
        self.resumed = ckpt.load_checkpoint(self.resume_path)  # (model, optimizer, meta) states
        meta = self.resumed[2]
        saved = meta.get("settings", {})
        conflicts = []
        for key in RESUMED_SETTINGS:
            if key not in saved:
                continue
            if key in explicit and getattr(args, key) != saved[key]:
                conflicts.append(f"--{key} {getattr(args, key)} (the run has {saved[key]})")
            setattr(args, key, saved[key])
        if conflicts:
            raise UserError(f"--resume {args.resume}: flags contradict the run being resumed: "
                            + "; ".join(conflicts) + ". Leave them out to resume as it was")
        for key in ("data_path", "val_data_path", "eval_interval"):  # where, not what
            if key not in explicit:
                setattr(args, key, saved.get(key, getattr(args, key)))

    def _make_data(self):
        a = self.args
        self.val_dataset = None
        if a.synthetic and a.val_data_path is not None:
            raise UserError("--val_data_path needs real training data, not --synthetic")
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
                             crop_scale=(a.min_crop_scale, 1.0), warn_unreadable=False)
        if len(self.loader) == 0:
            raise UserError(f"{root}: {len(dataset.samples)} images are too few for one batch of "
                            f"{a.per_batch_size} per process on {self.world} process(es)")
        if a.val_data_path is not None:
            self.val_dataset = ImageFolder(a.val_data_path)
            if self.val_dataset.classes != dataset.classes:
                raise UserError(f"--val_data_path {a.val_data_path}: its classes are not the "
                                f"training data's ({len(self.val_dataset.classes)} against "
                                f"{len(dataset.classes)} in {root}, or named differently)")

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
            # the stop decision travels with the gradients: no extra collective
            self.reducer = distributed.GradientAllreducer(list(self.model.parameters()),
                                                          flags=("stop", "nonfinite"))
        self.start_epoch, self.start_batch = 0, 0
        self._batches_done = 0
        self._last_saved = None  # (epoch_index, batches_done) of the last save
        self._unreadable_logged = 0
        self.best = None  # {"top1", "top5", "loss", "epoch"}: the best validation so far
        if self.resumed:
            self._resume(self.resume_path, *self.resumed)

    def _resume(self, path, model_state, optim_state, meta):
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
        self.best = meta.get("best")
        if self.start_batch >= self.steps_per_epoch:
            self.start_epoch, self.start_batch = self.start_epoch + 1, 0

    def _make_run_folder(self):
        a = self.args
        removed = []
        if self.rank == 0:
            # leftovers of saves killed midway, in the earlier runs of this
            # output path and in the folder resumed from
            folders = {os.path.join(a.output_path, d, "ckpt_0") for d in _subfolders(a.output_path)}
            if self.resume_path:
                folders.add(os.path.dirname(os.path.abspath(self.resume_path)))
            for folder in sorted(folders):
                removed += ckpt.remove_stale_parts(folder)
        # never shared: rank 0 creates it exclusively (a suffix if the name is
        # taken) and tells the others
        name = self.group.broadcast_object(make_run_folder(a.output_path) if self.rank == 0
                                           else None)
        self.run_dir = os.path.join(a.output_path, name)
        self.ckpt_dir = os.path.join(self.run_dir, "ckpt_0")
        if self.rank == 0:
            os.makedirs(self.ckpt_dir, exist_ok=True)
        self.group.barrier()
        self.log = setup_logger(self.run_dir, self.rank)
        self.tensorboard = None
        if a.tensorboard and self.rank == 0:
            self.tensorboard = tensorboard_writer_class()(os.path.join(self.run_dir, "tensorboard"))
        self.log.info(f"device {self.device}, {self.world} process(es), arch {a.arch}, "
                      f"{self.num_classes} classes, batch {a.per_batch_size} per process, "
                      f"image {a.image_size}, {self.steps_per_epoch} steps per epoch"
                      + (" (demo data)" if a.demo else ""))
        for path in removed:
            self.log.info(f"removed {path}, left by a save that was killed")
        if self.resumed:
            m = self.resumed[2]
            self.log.info(f"resumed from {self.resume_path}: epoch {m['epoch_index'] + 1}, "
                          f"{m['batches_done']} steps of it done (global step "
                          f"{m.get('global_step')}), learning rate "
                          f"{self.optimizer.param_groups[0]['lr']:.6g}")

    # -- saving ----------------------------------------------------------------
    def save(self, epoch_index, batches_done, best=False):
        """Rank 0 writes ``{rank}-{epoch}_{step}.ckpt`` (epoch 1-based), or with
        ``best`` ``best.ckpt``, which the rotation never deletes. Raises
        NonFiniteError on every rank, writing nothing, when an array is not
        finite (rank 0 decides; every rank calls this at the same point, so the
        whole job stops together instead of the others waiting on rank 0)."""
        refused = (self._write_checkpoint(epoch_index, batches_done, best) if self.rank == 0
                   else None)
        if self.world > 1 and self.group.allreduce_sum(int(refused is not None)):
            raise refused or ckpt.NonFiniteError("rank 0 refused to write a checkpoint holding "
                                                 "NaN or infinity")
        if refused is not None:
            raise refused

    def _write_checkpoint(self, epoch_index, batches_done, best=False):
        """Write the checkpoint; return the NonFiniteError that refused it, or None."""
        meta = {"epoch_index": epoch_index, "batches_done": batches_done,
                "global_step": self.scheduler.last_step + 1,
                "scheduler": self.scheduler.state_dict(),
                "arch": self.args.arch, "num_classes": self.num_classes,
                "image_size": self.args.image_size, "demo": self.args.demo, "best": self.best,
                "settings": {k: v for k, v in vars(self.args).items()
                             if isinstance(v, (int, float, str, bool, type(None)))}}
        name = BEST_NAME if best else ckpt.checkpoint_name(self.rank, epoch_index + 1,
                                                             batches_done)
        path = os.path.join(self.ckpt_dir, name)
        try:
            ckpt.save_checkpoint(path, self.model, self.optimizer, meta)
        except ckpt.NonFiniteError as e:
            return e
        except OSError as e:  # a full disk: the earlier checkpoints stay intact
            raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}; the earlier "
                            f"checkpoints in {self.ckpt_dir} are intact") from None
        if best:
            self.log.info(f"saved {path}: the best validation top-1 so far, "
                          f"{100 * self.best['top1']:.2f}%")
            return None
        ckpt.prune_checkpoints(self.ckpt_dir, self.args.ckpt_save_max)  # best.ckpt never
        self._last_saved = (epoch_index, batches_done)
        self.log.info(f"saved checkpoint {path}")
        return None

    def newest_good_checkpoint(self):
        """A sentence naming the newest checkpoint a resume can start from.
        Every checkpoint written is finite (save refuses otherwise)."""
        found = ckpt.list_checkpoints(self.ckpt_dir) if os.path.isdir(self.ckpt_dir) else []
        if found:
            return f"the newest good checkpoint is {found[0][2]}"
        if self.resume_path:
            return f"no checkpoint was written in this run; it resumed from {self.resume_path}"
        return "no checkpoint was written in this run"

    # -- training ----------------------------------------------------------------
    def step(self, images, labels):
        """One training step, queued on the device: nothing in it reads a device
        value back (on a GPU that would wait for the step to finish). Returns
        (loss, nonfinite, stop, lr) for ``_read_steps``: ``loss`` and
        ``nonfinite`` are 0-d device arrays; ``stop`` is a bool, or under mpirun
        a 0-d array. ``nonfinite`` and ``stop`` are the decision of all ranks
        together (a non-finite loss or gradient on any rank; a signal on any
        rank). A non-finite step is not applied: the SGD update reads
        ``nonfinite`` on the device and changes nothing."""
        xp = self.xp
        x = mt.Tensor(normalize(xp.asarray(images), xp, numpy.float32))
        lr = self.scheduler.step()
        self.optimizer.zero_grad()
        # labels on the host are checked there and copied; labels on the device
        # came through DevicePrefetcher, which checked them on the host first
        loss = cross_entropy(self.model(x), labels, label_smoothing=self.args.label_smooth_factor)
        loss.backward()
        nonfinite = self.optimizer.nonfinite(loss.data)
        stop = self.stops.requested is not None
        if self.reducer is not None:
            self.reducer.set_flags(stop=stop, nonfinite=nonfinite)
            self.reducer.synchronize()
            stop, nonfinite = self.reducer.flag_sum("stop"), self.reducer.flag_sum("nonfinite")
        self.optimizer.step(skip=nonfinite)
        return loss.data, nonfinite, stop, lr

    _device_batches = None

    def _prefetcher(self):
        """The loader's batches copied to the GPU one ahead (one prefetcher for
        the run: its pinned buffers serve every epoch)."""
        if self._device_batches is None:
            self._device_batches = DevicePrefetcher(self.loader, check=self._check_batch)
        return self._device_batches

    def _check_batch(self, batch):
        """A host batch's labels are class indices, checked before they move to
        the GPU (there a bad one would only show as a NaN loss)."""
        check_labels(batch[1], self.num_classes)

    def read_interval(self):
        """Steps between reads of the steps' results (loss, non-finite and stop
        flags) by the host: every step on a CPU, where reading costs nothing;
        every --log_interval steps on a GPU, so that the host queues steps ahead
        of the device instead of waiting for each. Also read: at the end of an
        epoch, and at once when this single process is asked to stop."""
        return 1 if self.device == "cpu" else self.args.log_interval

    def fit(self):
        # on the CPU, the cores kept from halting between the step's bursts (minitorch_gx/cpu.py)
        awake = cpu.cores_awake() if self.device == "cpu" else contextlib.nullcontext()
        try:
            with StopSignals() as self.stops, awake:
                return self._fit()
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()

    def _fit(self):
        a = self.args
        self._clock = RunClock(self.steps_per_epoch, a.max_epoch, self.start_epoch,
                               self.start_batch)
        for epoch_index in range(self.start_epoch, a.max_epoch):
            status = self._epoch(epoch_index)
            if status is not None:
                return status
        self.log.info(f"training finished: checkpoints in {self.ckpt_dir}")
        return 0

    def _epoch(self, epoch_index):
        """Train one epoch; None when it ended normally, else the exit status."""
        a, start = self.args, self.start_batch if epoch_index == self.start_epoch else 0
        self.loader.set_epoch(epoch_index, start_batch=start)
        self._batches_done = start
        progress = _Progress(self.steps_per_epoch, start, epoch_index, a.max_epoch, self.rank)
        epoch = EpochTally(time.perf_counter())
        pending, interval = [], self.read_interval()
        batches = iter(self.loader if self.device == "cpu" else self._prefetcher())
        while self._batches_done < self.steps_per_epoch:
            waited = time.perf_counter()
            batch = next(batches, None)
            epoch.data_s += time.perf_counter() - waited
            if batch is None:
                break
            images, labels = batch
            pending.append(self.step(images, labels))
            self._batches_done += 1
            epoch.images += len(labels)
            if (self._batches_done % interval and self._batches_done < self.steps_per_epoch
                    and not (self.world == 1 and self.stops.requested is not None)):
                continue
            status = self._read_steps(pending, epoch_index, epoch, progress)
            pending = []
            if status is not None:
                progress.close()
                return status
        progress.close()
        status = self._end_epoch(epoch_index, start, epoch)
        self.start_batch = 0
        # One process can stop at once on a signal that came after the last
        # step; ranks stop together at the next step, where the flag travels.
        if status is None and self.stops.requested is not None and self.world == 1:
            return self._stop_for_signal(epoch_index)
        return status

    def _read_steps(self, pending, epoch_index, epoch, progress):
        """Read the results of the steps taken since the last read (``pending``,
        the last of which ended at ``self._batches_done``), log them, and act
        on them: the exit status if the run must stop, else None. A non-finite
        step comes first: the run stops there, saving nothing (its steps after
        it are in memory only). Then a stop signal: the state after the last
        step is saved. Step lines: every --log_interval steps and at the last
        step of every epoch; the loss they show is this rank's, with its mean
        over the epoch so far."""
        a, first = self.args, self._batches_done - len(pending) + 1
        values = host_values(pending)
        for i, (loss, nonfinite, _, _) in enumerate(values):
            if nonfinite:
                self.log.error(f"epoch: {epoch_index + 1} step: {first + i}, loss is {loss}: a "
                               f"loss or gradient is not finite (on some rank); the step was not "
                               f"applied; stopping. {self.newest_good_checkpoint()}")
                return 1
        rate = epoch.images * self.world / (time.perf_counter() - epoch.started)
        for i, (loss, _, _, lr) in enumerate(values):
            step = first + i
            epoch.losses.append(loss)
            mean = float(numpy.mean(epoch.losses))
            progress.update(mean, lr, rate)
            if step % a.log_interval == 0 or step == self.steps_per_epoch:
                self.log.info(f"epoch: {epoch_index + 1} step: {step}/{self.steps_per_epoch}, "
                              f"loss {loss:.4f} (epoch mean {mean:.4f}), lr {lr:.6f}, "
                              f"{rate:.1f} img/s", extra={"console": progress.bar is None})
                self._scalars(epoch_index * self.steps_per_epoch + step,
                              {"train/loss": loss, "train/loss_epoch_mean": mean, "train/lr": lr})
        if any(stop for _, _, stop, _ in values):
            return self._stop_for_signal(epoch_index)
        return None

    def _stop_for_signal(self, epoch_index):
        code = self.stops.exit_code or 130  # a signal on another rank: report it as SIGINT
        saved = self._last_saved == (epoch_index, self._batches_done)
        self.log.info(f"stopping at epoch {epoch_index + 1} step {self._batches_done} on a "
                      f"signal" + ("" if saved else ": saving a checkpoint first"))
        if not saved:
            try:
                self.save(epoch_index, self._batches_done)
            except ckpt.NonFiniteError as e:
                self.log.error(f"{e}. {self.newest_good_checkpoint()}")
                return 1
        return code

    def _end_epoch(self, epoch_index, start, epoch):
        a, steps = self.args, max(1, self._batches_done - start)
        seconds = time.perf_counter() - epoch.started
        # images/s: the total over the ranks; data time: the ranks' mean
        rate = self.group.allreduce_sum(epoch.images / seconds)
        data_ms = 1000 * self.group.allreduce_sum(epoch.data_s) / self.world / steps
        losses = epoch.losses
        self.log.info(f"epoch: {epoch_index + 1} step: {self._batches_done}, loss is {losses[-1]}")
        self.log.info(f"epoch time: {seconds * 1000:.3f} ms, per step time: "
                      f"{seconds * 1000 / steps:.3f} ms")
        unreadable = self.loader.unreadable  # path -> reason, each file once
        for path in list(unreadable)[self._unreadable_logged:]:
            self.log.warning(f"unreadable image {path} ({unreadable[path]}): replaced by the "
                             f"next sample")
        self._unreadable_logged = corrupt = len(unreadable)
        if corrupt:
            self.log.warning(f"{corrupt} unreadable image file(s) met so far on rank {self.rank}")
        last = epoch_index + 1 == a.max_epoch
        val = None
        if self.val_dataset is not None and ((epoch_index + 1) % a.eval_interval == 0 or last):
            val = self._validate(epoch_index)
        self._clock.epoch_done(epoch_index, steps)
        self.log.info(f"run: epoch {epoch_index + 1}/{a.max_epoch} done, elapsed "
                      f"{_hms(self._clock.elapsed())}, ETA {_hms(self._clock.eta())}, "
                      f"{rate:.1f} img/s over {self.world} process(es); per step "
                      f"{seconds * 1000 / steps:.1f} ms: data {data_ms:.1f} ms, compute "
                      f"{seconds * 1000 / steps - data_ms:.1f} ms")
        global_step = (epoch_index + 1) * self.steps_per_epoch
        self._scalars(global_step, {"train/img_per_sec": rate, "train/data_ms_per_step": data_ms})
        if self.rank == 0:
            record = {"epoch": epoch_index + 1, "global_step": self.scheduler.last_step + 1,
                      "loss_mean": float(numpy.mean(losses)), "loss_last": losses[-1],
                      "lr": self.optimizer.param_groups[0]["lr"], "img_per_sec": rate,
                      "epoch_time_s": seconds, "data_ms_per_step": data_ms,
                      "corrupt_images": corrupt}
            if val is not None:
                record.update(val_top1=val.top1 / val.total, val_top5=val.top5 / val.total,
                              val_loss=val.loss, val_images=val.total,
                              best_top1=self.best["top1"], best_epoch=self.best["epoch"])
            with open(os.path.join(self.ckpt_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        try:
            if (epoch_index + 1) % a.ckpt_interval == 0 or last:
                self.save(epoch_index, self._batches_done)
            if val is not None and self.best["epoch"] == epoch_index + 1:
                self.save(epoch_index, self._batches_done, best=True)
        except ckpt.NonFiniteError as e:  # e.g. a BN running variance that overflowed
            self.log.error(f"{e}: stopping. {self.newest_good_checkpoint()}")
            return 1
        return None

    def _validate(self, epoch_index):
        """Score the model on --val_data_path as eval.py does (``evaluate``, the
        same preprocessing, counting and sharding; the training batch size),
        log it, and keep ``self.best``. Returns the Scores."""
        a = self.args
        loader = Loader(self.val_dataset, batch_size=a.per_batch_size, train=False,
                        image_size=a.image_size, num_workers=a.num_workers, seed=a.seed,
                        rank=self.rank, world_size=self.world, warn_unreadable=False)
        try:
            scores = evaluate(self.model, loader, self.xp, self.group)
        finally:
            loader.close()
            self.model.train()
        if scores.total == 0:
            raise UserError(f"--val_data_path {a.val_data_path}: no image could be read")
        top1, top5 = scores.top1 / scores.total, scores.top5 / scores.total
        improved = self.best is None or top1 > self.best["top1"]
        if improved:
            self.best = {"top1": top1, "top5": top5, "loss": scores.loss,
                         "epoch": epoch_index + 1}
        self.log.info(f"validation: epoch {epoch_index + 1}, top-1 {100 * top1:.2f}% top-5 "
                      f"{100 * top5:.2f}% loss {scores.loss:.4f} on {scores.total} images; best "
                      f"top-1 {100 * self.best['top1']:.2f}% (epoch {self.best['epoch']})")
        if scores.nonfinite:
            self.log.warning(f"validation: {scores.nonfinite} of {scores.total} rows had "
                             f"non-finite logits and were scored wrong")
        self._scalars((epoch_index + 1) * self.steps_per_epoch,
                      {"val/top1": top1, "val/top5": top5, "val/loss": scores.loss})
        return scores

    def _scalars(self, step, values):
        if self.tensorboard is not None:
            for tag, value in values.items():
                self.tensorboard.add_scalar(tag, value, step)


class EpochTally:
    """What one epoch has done so far in this process."""

    def __init__(self, started):
        self.started = started   # time.perf_counter()
        self.images = 0          # images trained on
        self.data_s = 0.0        # seconds spent waiting for batches
        self.losses = []         # every step's loss, as read


class RunClock:
    """Elapsed time and ETA for the whole run: the time per step of the steps
    this process has run (validation and saves included), times the steps left."""

    def __init__(self, steps_per_epoch, max_epoch, start_epoch, start_batch):
        self.started = time.perf_counter()
        self.steps_per_epoch, self.max_epoch = steps_per_epoch, max_epoch
        self.steps_done = 0
        self.steps_left = (max_epoch - start_epoch) * steps_per_epoch - start_batch

    def epoch_done(self, epoch_index, steps):
        self.steps_done += steps
        self.steps_left = (self.max_epoch - epoch_index - 1) * self.steps_per_epoch

    def elapsed(self):
        return time.perf_counter() - self.started

    def eta(self):
        return self.elapsed() / max(self.steps_done, 1) * self.steps_left


def _hms(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def host_values(pending):
    """[(loss, nonfinite, stop, lr)] as host numbers, for the steps' results
    ``pending``: the one place where the training loop waits for the device."""
    def number(v):
        return float(v) if isinstance(v, (bool, int, float)) else float(backend.to_numpy(v))
    return [(number(loss), number(nonfinite) > 0, number(stop) > 0, lr)
            for loss, nonfinite, stop, lr in pending]


def tensorboard_writer_class():
    """tensorboardX's SummaryWriter, or a UserError saying how to get it."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the optional extra: pip install -e "
                        "\".[tensorboard]\" (it installs tensorboardX)") from None
    return SummaryWriter


class _Progress:
    """A tqdm bar on a terminal (rank 0): the epoch's steps, its mean loss so
    far, lr and images/s, left on screen as the epoch's summary line. Off a
    terminal (or on other ranks) no bar: the log's step lines say the same."""

    def __init__(self, total, start, epoch_index, max_epoch, rank):
        self.bar = None
        if sys.stderr.isatty() and rank == 0:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc=f"epoch {epoch_index + 1}/{max_epoch}",
                            leave=True, dynamic_ncols=True)

    def update(self, mean_loss, lr, rate):
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.5f}", img_s=f"{rate:.1f}")
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _subfolders(path):
    return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))) \
        if os.path.isdir(path) else []


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = train_parser()
    args = parser.parse_args(argv)
    run = Run(args, explicit_flags(parser, argv))
    return run.fit()
