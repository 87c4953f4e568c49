"""The public ops, by PyTorch's names: ``minitorch_gx.functional`` is to this
package what ``torch.nn.functional`` is to PyTorch.

Each function takes Tensors (or arrays), returns a Tensor, and records itself
for ``backward()``. The implementations live in the ``functions_*`` modules,
one family per file.
"""
from .functions_basic import add, flatten, linear, matmul, mean, mul, relu, reshape, sum
from .functions_conv import conv2d
from .functions_loss import accuracy, cross_entropy, log_softmax, topk_correct
from .functions_norm import batch_norm
from .functions_pool import adaptive_avg_pool2d, avg_pool2d, max_pool2d

__all__ = ["add", "mul", "relu", "reshape", "flatten", "sum", "mean", "matmul", "linear",
           "conv2d", "batch_norm", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
           "log_softmax", "cross_entropy", "topk_correct", "accuracy"]
