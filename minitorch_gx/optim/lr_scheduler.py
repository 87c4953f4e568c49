"""The recipe's learning-rate schedule: linear warm-up, then cosine annealing.

During the first ``warmup_epochs`` the rate rises linearly per step from 0 to
``base_lr`` (step i gets base_lr * (i + 1) / warmup_steps). After that it
follows a cosine over epochs, constant within an epoch:
    lr(epoch) = eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2
with T_max = max_epoch, as in the original MindSpore ResNeXt code.
"""
import math


def warmup_cosine_lr(step, steps_per_epoch, base_lr, warmup_epochs, max_epoch, eta_min=0.0):
    """Learning rate at global step ``step`` (0-based)."""
    warmup_steps = int(warmup_epochs * steps_per_epoch)
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    epoch = step // steps_per_epoch
    return eta_min + (base_lr - eta_min) * (1.0 + math.cos(math.pi * epoch / max_epoch)) / 2.0


class WarmupCosineLR:
    """Sets every group's lr from the global step: call ``step()`` once per
    optimizer step, before it. ``last_step`` is saved in checkpoints."""

    def __init__(self, optimizer, steps_per_epoch, warmup_epochs, max_epoch, eta_min=0.0,
                 base_lr=None):
        self.optimizer = optimizer
        self.steps_per_epoch, self.warmup_epochs = steps_per_epoch, warmup_epochs
        self.max_epoch, self.eta_min = max_epoch, eta_min
        self.base_lrs = [base_lr if base_lr is not None else g["lr"] for g in optimizer.param_groups]
        self.last_step = -1

    def lr_at(self, step, base_lr):
        return warmup_cosine_lr(step, self.steps_per_epoch, base_lr, self.warmup_epochs,
                                self.max_epoch, self.eta_min)

    def step(self):
        self.last_step += 1
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = self.lr_at(self.last_step, base)
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self):
        return {"last_step": self.last_step, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state):
        self.last_step = int(state["last_step"])
        self.base_lrs = [float(b) for b in state["base_lrs"]]
