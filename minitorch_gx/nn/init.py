"""Weight initialisers (in place on a Parameter's array), as ``torch.nn.init``."""
import math

import numpy

from .. import backend


def kaiming_normal_(param, mode="fan_out", nonlinearity="relu", rng=None):
    """Normal(0, gain / sqrt(fan)) with gain sqrt(2) for ReLU (He et al., 2015)."""
    shape = param.shape
    receptive = int(numpy.prod(shape[2:])) if len(shape) > 2 else 1
    fan = (shape[0] if mode == "fan_out" else shape[1]) * receptive
    gain = math.sqrt(2.0) if nonlinearity == "relu" else 1.0
    rng = rng or numpy.random.default_rng()
    values = rng.normal(0.0, gain / math.sqrt(fan), shape).astype(param.dtype)
    _assign(param, values)


def constant_(param, value):
    param.data[...] = value


def uniform_(param, low, high, rng=None):
    rng = rng or numpy.random.default_rng()
    _assign(param, rng.uniform(low, high, param.shape).astype(param.dtype))


def _assign(param, values):
    xp = backend.get_array_module(param.data)
    param.data[...] = xp.asarray(values)
