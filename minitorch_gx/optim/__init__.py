"""Optimizers and learning-rate schedules."""
from .lr_scheduler import WarmupCosineLR, warmup_cosine_lr
from .sgd import SGD

__all__ = ["SGD", "WarmupCosineLR", "warmup_cosine_lr"]
