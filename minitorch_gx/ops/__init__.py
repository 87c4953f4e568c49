"""The ops, one file per family. Each reads top-down: the public function
and its Function (forward, backward); the array-level steps, each choosing
with ``backend.choose`` between a plain ``*_reference`` (the specification),
the NumPy fast path and this project's CUDA kernel (whose launcher, in
``minitorch_gx.cuda``, is imported by name); then the references; then the
fast path.

    basic.py  add, mul, relu, add_relu (the residual join), reshape, sum,
              mean, matmul, linear; binds Tensor's operators
    conv.py   conv2d: grouped, strided, padded
    norm.py   batch_norm, with the ReLU that follows it fused in
    pool.py   max_pool2d, avg_pool2d, adaptive_avg_pool2d
    loss.py   log_softmax, cross_entropy with label smoothing, top-k accuracy
"""
