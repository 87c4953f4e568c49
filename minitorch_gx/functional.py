"""The public ops, by PyTorch's names: ``minitorch_gx.functional`` is to this
package what ``torch.nn.functional`` is to PyTorch.

Each function takes Tensors (or arrays), returns a Tensor, and records itself
for ``backward()``. The implementations live in ``minitorch_gx/ops/``, one
family per file.
"""
from .ops.basic import add, add_relu, flatten, linear, matmul, mean, mul, relu, reshape, sum
from .ops.conv import conv2d
from .ops.loss import accuracy, cross_entropy, log_softmax, topk_correct
from .ops.norm import batch_norm
from .ops.pool import adaptive_avg_pool2d, avg_pool2d, max_pool2d

__all__ = ["add", "add_relu", "mul", "relu", "reshape", "flatten", "sum", "mean", "matmul", "linear",
           "conv2d", "batch_norm", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
           "log_softmax", "cross_entropy", "topk_correct", "accuracy"]
