"""The layers ResNeXt is built from, with PyTorch's names and attributes.

Each layer owns its parameters and buffers and calls one function of
``minitorch_gx.functional`` in ``forward``.
"""
import math

import numpy

from .. import functional as F
from .module import Module, Parameter


class Sequential(Module):
    """Calls its children in order; they are named "0", "1", ..."""

    def __init__(self, *layers):
        super().__init__()
        for i, layer in enumerate(layers):
            setattr(self, str(i), layer)

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def forward(self, x):
        for layer in self._modules.values():
            x = layer(x)
        return x


class Conv2d(Module):
    """2-D convolution; ``weight`` (out, in/groups, kh, kw), optional ``bias`` (out,)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 groups=1, bias=True, dtype=numpy.float32):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels {in_channels} and out_channels {out_channels} "
                             f"must both be divisible by groups {groups}")
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        self.stride, self.padding, self.groups = stride, padding, groups
        # PyTorch's default: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)); models re-initialise.
        fan_in = in_channels // groups * k[0] * k[1]
        bound = 1.0 / math.sqrt(fan_in)
        rng = numpy.random.default_rng()
        self.weight = Parameter(rng.uniform(-bound, bound, (out_channels, in_channels // groups) + k)
                                .astype(dtype))
        self.bias = Parameter(rng.uniform(-bound, bound, out_channels).astype(dtype)) if bias else None

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.groups)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
                f"bias={self.bias is not None}")


class BatchNorm2d(Module):
    """Batch normalisation over (N, H, W) per channel.

    Training uses the batch statistics and updates the running ones
    (PyTorch's convention: ``running = (1 - momentum) * running + momentum *
    batch``, unbiased batch variance in the update, biased in the
    normalisation); eval uses the running statistics.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, dtype=numpy.float32):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = Parameter(numpy.ones(num_features, dtype))
        self.bias = Parameter(numpy.zeros(num_features, dtype))
        self.register_buffer("running_mean", numpy.zeros(num_features, dtype))
        self.register_buffer("running_var", numpy.ones(num_features, dtype))
        self.register_buffer("num_batches_tracked", numpy.zeros((), numpy.int64))

    def forward(self, x, relu=False):
        """``relu=True`` applies ReLU in the same op, saving a pass over memory."""
        if self.training:
            self.num_batches_tracked += 1
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=self.training, momentum=self.momentum, eps=self.eps,
                            relu=relu)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class Linear(Module):
    """y = x W^T + b; ``weight`` (out, in), ``bias`` (out,)."""

    def __init__(self, in_features, out_features, bias=True, dtype=numpy.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        rng = numpy.random.default_rng()
        self.weight = Parameter(rng.uniform(-bound, bound, (out_features, in_features)).astype(dtype))
        self.bias = Parameter(rng.uniform(-bound, bound, out_features).astype(dtype)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}"


class ReLU(Module):
    def forward(self, x):
        return F.relu(x)


class MaxPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride or kernel_size, padding

    def forward(self, x):
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AdaptiveAvgPool2d(Module):
    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size

    def forward(self, x):
        return F.adaptive_avg_pool2d(x, self.output_size)

    def extra_repr(self):
        return f"output_size={self.output_size}"


class Flatten(Module):
    def __init__(self, start_dim=1):
        super().__init__()
        self.start_dim = start_dim

    def forward(self, x):
        return F.flatten(x, self.start_dim)
