"""Layers: ``Module`` and the building blocks of ResNeXt, named as in PyTorch."""
from .module import Module, Parameter, StateDictError
from .layers import (AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU,
                     Sequential)
from . import init

__all__ = ["Module", "Parameter", "StateDictError", "Sequential", "Conv2d", "BatchNorm2d",
           "Linear", "ReLU", "MaxPool2d", "AdaptiveAvgPool2d", "Flatten", "init"]
