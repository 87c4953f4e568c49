"""Launchers for the project's own CUDA C kernels (``kernels/*.cu``).

Each public function takes arrays, checks shapes and dtypes, allocates the
outputs and launches kernels; its name and signature match the reference op
it replaces (``functions_conv``, ``functions_norm``, the SGD optimizer), so an
op module can set ``gpu_impl = cuda_kernels``. CuPy arrays run on the GPU,
NumPy arrays in the CPU emulator (see ``cuda_launch``): the same launch code.

Design choices:
  - 1x1 convolutions with groups=1 (3.88 of ResNeXt50's 4.23 GMACs) are plain
    matrix products: they go to cuBLAS through ``xp.matmul``/``xp.tensordot``
    (NumPy's BLAS in the emulator), which no hand-written kernel here would
    beat. Every other convolution -- the grouped 3x3 convs, the 7x7 stem (an
    im2col buffer for it would take ~2 GB at batch 256) and any grouped 1x1 --
    runs our implicit-GEMM kernels.
  - Kernels index with 32-bit ints; the launchers refuse arrays of 2^31 or
    more elements.
  - float32 is what the GPU trains in; float64 works too (the kernels are
    compiled with -DREAL=double), for gradient checks.
"""
import numpy

# LAUNCH, KERNEL_FILES, NVRTC_OPTIONS and builds are re-exported: tests and
# benchmarks read and change them through this module.
from .cuda_launch import KERNEL_FILES, LAUNCH, NVRTC_OPTIONS, builds, device_for  # noqa: F401
from .cuda_launch import blocks as _blocks, check_size as _check_size, defines as _defines
from .cuda_launch import inplace as _inplace, pair as _pair, write_back as _write_back

GEMM_FOR_1X1 = True  # route groups=1 1x1 convolutions to cuBLAS (see the module docstring)
_i32, _i64 = numpy.int32, numpy.int64


# --------------------------------------------------------------------------
# Grouped convolution (kernels/grouped_conv.cu, grouped_conv_bwd_weight.cu)
# --------------------------------------------------------------------------
def _conv_geometry(x_shape, W_shape, stride, padding, groups):
    n, c, h, w = x_shape
    k, cg, r, s = W_shape
    (sh, sw), (ph, pw) = _pair(stride, "stride"), _pair(padding, "padding")
    if groups < 1 or c != cg * groups or k % groups:
        raise ValueError(f"conv2d: input channels {c} and filter shape {tuple(W_shape)} do not "
                         f"fit groups={groups} (need C = Cg * groups and K % groups == 0)")
    p, q = (h + 2 * ph - r) // sh + 1, (w + 2 * pw - s) // sw + 1
    if p < 1 or q < 1 or min(sh, sw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"conv2d: no output for input {tuple(x_shape)}, filter {r}x{s}, "
                         f"stride {(sh, sw)}, padding {(ph, pw)}")
    return (n, c, h, w, k, p, q, groups, r, s, sh, sw, ph, pw)


def _tile_rows(m):
    """BM of grouped_conv.cu: the smallest of 4, 8, 16, 32 covering m channels."""
    return min(32, max(4, 1 << (m - 1).bit_length()))


def _use_gemm(geo):
    n, c, h, w, k, p, q, groups, r, s, sh, sw, ph, pw = geo
    return GEMM_FOR_1X1 and groups == 1 and r == s == 1 and ph == pw == 0


def _conv_gemm_launch(kernel, src, W, dst, geo, rows):
    dev = device_for(src)
    threads = LAUNCH["CONV_THREADS"]
    bm = _tile_rows(rows)
    bn = threads * 16 // bm
    n, c, h, w, k, p, q, groups = geo[:8]
    cols = n * (h * w if kernel.endswith("data") else p * q)
    grid = (-(-cols // bn), groups * -(-rows // bm))
    if grid[1] > 65535:
        raise ValueError(f"conv2d: {groups} groups is more than this kernel's grid allows")
    args = [src, W, dst] + [_i32(v) for v in geo] + [_i32(bm)]
    dev.launch("grouped_conv.cu", kernel, grid, (threads,), args,
               defines=_defines(src.dtype, "CONV_THREADS"))


def conv2d_forward(x, W, stride, padding, groups):
    """y (N, K, P, Q) = grouped convolution of x (N, C, H, W) with W (K, C/groups, R, S)."""
    dev = device_for(x)
    geo = _conv_geometry(x.shape, W.shape, stride, padding, groups)
    n, c, h, w, k, p, q, g, r, s, sh, sw = geo[:12]
    if _use_gemm(geo):
        xp = dev.xp
        xs = xp.ascontiguousarray(x[:, :, ::sh, ::sw]).reshape(n, c, p * q)
        return xp.matmul(W.reshape(k, c), xs).reshape(n, k, p, q)  # cuBLAS, batched over n
    dtype = x.dtype
    x, W = dev.input(x, dtype), dev.input(W, dtype)
    y = dev.empty((n, k, p, q), dtype)
    _check_size(x=x, y=y)
    _conv_gemm_launch("grouped_conv2d_fwd", x, W, y, geo, k // g)
    return y


def conv2d_backward_data(gy, W, x_shape, stride, padding, groups):
    """gx (N, C, H, W): the gradient of conv2d_forward with respect to x."""
    dev = device_for(gy)
    geo = _conv_geometry(tuple(x_shape), W.shape, stride, padding, groups)
    n, c, h, w, k, p, q, g, r, s, sh, sw = geo[:12]
    if tuple(gy.shape) != (n, k, p, q):
        raise ValueError(f"conv2d backward: gy has shape {tuple(gy.shape)}, "
                         f"expected {(n, k, p, q)}")
    if _use_gemm(geo):
        xp = dev.xp
        gxs = xp.matmul(W.reshape(k, c).T, gy.reshape(n, k, p * q)).reshape(n, c, p, q)
        if sh == sw == 1:
            return gxs
        gx = xp.zeros((n, c, h, w), gy.dtype)
        gx[:, :, ::sh, ::sw] = gxs  # the positions the strided 1x1 filter read
        return gx
    dtype = gy.dtype
    gy, W = dev.input(gy, dtype), dev.input(W, dtype)
    gx = dev.empty((n, c, h, w), dtype)
    _check_size(gy=gy, gx=gx)
    _conv_gemm_launch("grouped_conv2d_bwd_data", gy, W, gx, geo, c // g)
    return gx


WGRAD_KT, WGRAD_TAPS = 4, 9  # as KT and TAPS in grouped_conv_bwd_weight.cu


def conv2d_backward_weight(gy, x, W_shape, stride, padding, groups):
    """gW (K, C/groups, R, S): the gradient of conv2d_forward with respect to W."""
    dev = device_for(gy)
    geo = _conv_geometry(x.shape, tuple(W_shape), stride, padding, groups)
    n, c, h, w, k, p, q, g, r, s, sh, sw = geo[:12]
    if tuple(gy.shape) != (n, k, p, q):
        raise ValueError(f"conv2d backward: gy has shape {tuple(gy.shape)}, "
                         f"expected {(n, k, p, q)}")
    if _use_gemm(geo):
        xp = dev.xp
        xs = xp.ascontiguousarray(x[:, :, ::sh, ::sw]).reshape(n, c, p * q)
        gW = xp.tensordot(gy.reshape(n, k, p * q), xs, axes=([0, 2], [0, 2]))  # (K, C)
        return gW.reshape(k, c, 1, 1).astype(gy.dtype, copy=False)
    dtype = gy.dtype
    gy, x = dev.input(gy, dtype), dev.input(x, dtype)
    gW = dev.zeros(tuple(W_shape), dtype)
    _check_size(gy=gy, x=x)
    threads = LAUNCH["WGRAD_THREADS"]
    pieces = g * (c // g) * -(-(k // g) // WGRAD_KT) * -(-(r * s) // WGRAD_TAPS)
    pixels = n * p * q
    # Each thread should sum a few dozen pixels before the block's reduction,
    # but keep ~2 blocks per GPU core slot in flight when the pieces are few.
    splits = -(-pixels // (threads * 32))
    if pieces * splits < 1024:
        splits = max(splits, min(-(-pixels // (threads * 4)), -(-1024 // pieces)))
    splits = max(1, min(splits, 65535))
    dev.launch("grouped_conv_bwd_weight.cu", "grouped_conv2d_bwd_weight", (pieces, splits),
               (threads,), [gy, x, gW] + [_i32(v) for v in geo],
               defines=_defines(dtype, "WGRAD_THREADS"))
    return gW


# --------------------------------------------------------------------------
# Batch norm (kernels/batch_norm.cu)
# --------------------------------------------------------------------------
def _bn_dims(x):
    if x.ndim < 2:
        raise ValueError(f"batch norm expects (N, C, ...) input, got shape {x.shape}")
    n, c = x.shape[0], x.shape[1]
    if c > 65535:
        raise ValueError(f"batch norm kernels handle at most 65535 channels, got {c}")
    _check_size(x=x)
    return n, c, x.size // (n * c)


def _bn_splits(m, c):
    """Chunks per channel: enough blocks to fill the GPU, >= 4 values per thread."""
    threads = LAUNCH["BN_THREADS"]
    return max(1, min(-(-2048 // c), m // (threads * 4), 1024))


def _bn_launch(dev, kernel, grid, args, dtype):
    dev.launch("batch_norm.cu", kernel, grid, (LAUNCH["BN_THREADS"],), args,
               defines=_defines(dtype, "BN_THREADS"))


def _bn_vectors(dev, dtype, *vectors):
    return [dev.input(v, dtype) for v in vectors]


def batch_norm_train_forward(x, gamma, beta, eps, relu):
    """x (N, C, H, W) -> y, batch mean (C,), biased batch var (C,); ReLU fused if relu."""
    dev, dtype = device_for(x), x.dtype
    n, c, hw = _bn_dims(x)
    x = dev.input(x, dtype)
    gamma, beta = _bn_vectors(dev, dtype, gamma, beta)
    splits = _bn_splits(n * hw, c)
    part = dev.empty(c * splits * 3, dtype)
    _bn_launch(dev, "bn_fwd_reduce", (splits, c), [x, part, _i32(n), _i32(c), _i32(hw),
                                                   _i32(splits)], dtype)
    mean, var, invstd, scale, shift = (dev.empty(c, dtype) for _ in range(5))
    _bn_launch(dev, "bn_fwd_finalize", (_blocks(c, LAUNCH["BN_THREADS"]),),
               [part, _i32(splits), _i32(c), dtype.type(eps), gamma, beta, mean, var, invstd,
                scale, shift], dtype)
    y = dev.empty(x.shape, dtype)
    _bn_launch(dev, "bn_fwd_apply", (splits, c), [x, y, scale, shift, _i32(n), _i32(c), _i32(hw),
                                                  _i32(splits), _i32(bool(relu))], dtype)
    return y, mean, var


def _bn_backward(dev, gy, x, y, gamma, mean, invstd, relu, inv_count):
    dtype = x.dtype
    n, c, hw = _bn_dims(x)
    gy = dev.input(gy, dtype)
    y = dev.input(y, dtype) if relu else x  # not read without relu
    gamma, mean, invstd = _bn_vectors(dev, dtype, gamma, mean, invstd)
    splits = _bn_splits(n * hw, c)
    dims = [_i32(n), _i32(c), _i32(hw), _i32(splits)]
    part = dev.empty(c * splits * 2, dtype)
    _bn_launch(dev, "bn_bwd_reduce", (splits, c), [gy, x, y, mean, part] + dims +
               [_i32(bool(relu))], dtype)
    ggamma, gbeta = dev.empty(c, dtype), dev.empty(c, dtype)
    _bn_launch(dev, "bn_bwd_finalize", (_blocks(c, LAUNCH["BN_THREADS"]),),
               [part, _i32(splits), _i32(c), invstd, ggamma, gbeta], dtype)
    gx = dev.empty(x.shape, dtype)
    _bn_launch(dev, "bn_bwd_apply", (splits, c), [gy, x, y, mean, invstd, gamma, ggamma, gbeta,
                                                  gx] + dims + [dtype.type(inv_count),
                                                                _i32(bool(relu))], dtype)
    return gx, ggamma, gbeta


def batch_norm_backward(gy, x, y, gamma, mean, invstd, relu):
    """Training-mode backward -> (gx, ggamma, gbeta); y is read only when relu."""
    dev = device_for(x)
    x = dev.input(x, x.dtype)
    n, c, hw = _bn_dims(x)
    return _bn_backward(dev, gy, x, y, gamma, mean, invstd, relu, 1.0 / (n * hw))


def _bn_prepare(dev, dtype, c, gamma, beta, running_mean, running_var, eps):
    invstd, scale, shift = dev.empty(c, dtype), dev.empty(c, dtype), dev.empty(c, dtype)
    gamma, beta, running_mean, running_var = _bn_vectors(dev, dtype, gamma, beta, running_mean,
                                                         running_var)
    _bn_launch(dev, "bn_infer_prepare", (_blocks(c, LAUNCH["BN_THREADS"]),),
               [gamma, beta, running_mean, running_var, dtype.type(eps), _i32(c), invstd, scale,
                shift], dtype)
    return invstd, scale, shift


def batch_norm_infer_forward(x, gamma, beta, running_mean, running_var, eps, relu):
    """Eval-mode forward with the running statistics -> y like x."""
    dev, dtype = device_for(x), x.dtype
    n, c, hw = _bn_dims(x)
    x = dev.input(x, dtype)
    _, scale, shift = _bn_prepare(dev, dtype, c, gamma, beta, running_mean, running_var, eps)
    splits = _bn_splits(n * hw, c)
    y = dev.empty(x.shape, dtype)
    _bn_launch(dev, "bn_fwd_apply", (splits, c), [x, y, scale, shift, _i32(n), _i32(c), _i32(hw),
                                                  _i32(splits), _i32(bool(relu))], dtype)
    return y


def batch_norm_infer_backward(gy, x, y, gamma, running_mean, running_var, eps, relu):
    """Eval-mode backward (the statistics are constants) -> (gx, ggamma, gbeta)."""
    dev, dtype = device_for(x), x.dtype
    n, c, hw = _bn_dims(x)
    x = dev.input(x, dtype)
    # only invstd is wanted here; gamma stands in for beta, which does not enter it
    invstd, _, _ = _bn_prepare(dev, dtype, c, gamma, gamma, running_mean, running_var, eps)
    return _bn_backward(dev, gy, x, y, gamma, running_mean, invstd, relu, 0.0)


def batch_norm_update_running(running_mean, running_var, mean, var, count, momentum):
    """In place: r_mean = (1-m) r_mean + m mean; r_var = (1-m) r_var + m var count/(count-1)."""
    dev, dtype = device_for(running_mean), running_mean.dtype
    c = running_mean.size
    rm, rv = _inplace(dev, running_mean, dtype, "running_mean"), _inplace(dev, running_var, dtype,
                                                                          "running_var")
    mean, var = _bn_vectors(dev, dtype, mean, var)
    _bn_launch(dev, "bn_update_running", (_blocks(c, LAUNCH["BN_THREADS"]),),
               [rm, rv, mean, var, _i32(c), dtype.type(momentum), dtype.type(count)], dtype)
    _write_back(running_mean, rm)
    _write_back(running_var, rv)


# --------------------------------------------------------------------------
# SGD (kernels/sgd.cu)
# --------------------------------------------------------------------------
def sgd_momentum_update(p, g, buf, group_end, lrs, wds, momenta):
    """One fused SGD step over flat buffers, in place on p and buf.

    p, g, buf: flat (n,) arrays of one dtype. group_end: int64 (G,), the end
    offset of each contiguous parameter group (the last is n); pass the small
    per-group tables as NumPy arrays, they are copied to the device. lrs, wds,
    momenta: (G,) each group's learning rate, weight decay, momentum (cast to
    the parameters' dtype).
    """
    dev, dtype = device_for(p), p.dtype
    n = p.size
    if g.size != n or buf.size != n:
        raise ValueError(f"sgd: p, g and buf must have the same size, got {n}, {g.size}, "
                         f"{buf.size}")
    groups = len(group_end)
    if groups < 1 or not len(lrs) == len(wds) == len(momenta) == groups:
        raise ValueError("sgd: group_end, lrs, wds and momenta need one entry per group")
    if isinstance(group_end, numpy.ndarray) and int(group_end[-1]) != n:
        # checked on the host only: reading a device array back would stall every step
        raise ValueError(f"sgd: the last group ends at {int(group_end[-1])}, the buffers hold {n}")
    group_end = dev.input(group_end, numpy.int64)
    lrs, wds, momenta = (dev.input(v, dtype) for v in (lrs, wds, momenta))
    pp, bb = _inplace(dev, p, dtype, "p"), _inplace(dev, buf, dtype, "buf")
    g = dev.input(g, dtype)
    threads = LAUNCH["SGD_THREADS"]
    dev.launch("sgd.cu", "sgd_momentum_update", (_blocks(n, threads, 4096),), (threads,),
               [pp, g, bb, group_end, lrs, wds, momenta, _i32(groups), _i64(n)],
               defines=_defines(dtype, "SGD_THREADS"))
    _write_back(p, pp)
    _write_back(buf, bb)


# --------------------------------------------------------------------------
# Max pooling, softmax cross-entropy, residual add + ReLU
# --------------------------------------------------------------------------
def _pool_geometry(x_shape, kernel_size, stride, padding):
    n, c, h, w = x_shape
    kh, kw = _pair(kernel_size, "kernel_size")
    sh, sw = (kh, kw) if stride is None else _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    if kh * kw > 255:
        raise ValueError(f"max_pool2d kernel keeps the winning tap in a byte: window {kh}x{kw} "
                         f"is too large")
    if ph > kh // 2 or pw > kw // 2:
        raise ValueError(f"padding {(ph, pw)} must be at most half the kernel {(kh, kw)}")
    p, q = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    if p < 1 or q < 1:
        raise ValueError(f"max_pool2d: window {(kh, kw)} larger than the padded input {(h, w)}")
    return [n, c, h, w, p, q, kh, kw, sh, sw, ph, pw]


def max_pool2d_forward(x, kernel_size, stride, padding):
    """x (N, C, H, W) -> (y (N, C, P, Q), argmax uint8: the first winning tap i*kw+j)."""
    dev, dtype = device_for(x), x.dtype
    geo = _pool_geometry(x.shape, kernel_size, stride, padding)
    n, c, h, w, p, q = geo[:6]
    x = dev.input(x, dtype)
    y, argmax = dev.empty((n, c, p, q), dtype), dev.empty((n, c, p, q), numpy.uint8)
    _check_size(x=x, y=y)
    threads = LAUNCH["POOL_THREADS"]
    dev.launch("max_pool.cu", "max_pool2d_fwd", (_blocks(y.size, threads),), (threads,),
               [x, y, argmax] + [_i32(v) for v in geo], defines=_defines(dtype, "POOL_THREADS"))
    return y, argmax


def max_pool2d_backward(gy, argmax, x_shape, kernel_size, stride, padding):
    """gx (N, C, H, W): gy routed back to each window's winning tap."""
    dev, dtype = device_for(gy), gy.dtype
    geo = _pool_geometry(tuple(x_shape), kernel_size, stride, padding)
    gy, argmax = dev.input(gy, dtype), dev.input(argmax, numpy.uint8)
    gx = dev.empty(tuple(x_shape), dtype)
    _check_size(gx=gx)
    threads = LAUNCH["POOL_THREADS"]
    dev.launch("max_pool.cu", "max_pool2d_bwd", (_blocks(gx.size, threads),), (threads,),
               [gy, argmax, gx] + [_i32(v) for v in geo], defines=_defines(dtype, "POOL_THREADS"))
    return gx


def _smoothing(k, label_smoothing):
    """(on, off): the target on the true class and on each other class (functions_loss)."""
    eps = float(label_smoothing)
    off = eps / (k - 1) if eps > 0 else 0.0
    return 1.0 - eps, off


def softmax_cross_entropy_forward(logits, labels, label_smoothing):
    """logits (N, K), labels (N,) -> (loss (N,), lse (N,)) with log-sum-exp kept for backward."""
    dev, dtype = device_for(logits), logits.dtype
    n, k = logits.shape
    logits, labels = dev.input(logits, dtype), dev.input(labels, numpy.int64)
    on, off = _smoothing(k, label_smoothing)
    loss, lse = dev.empty(n, dtype), dev.empty(n, dtype)
    threads = LAUNCH["XENT_THREADS"]
    dev.launch("softmax_cross_entropy.cu", "softmax_xent_fwd", (n,), (threads,),
               [logits, labels, loss, lse, _i32(n), _i32(k), dtype.type(on), dtype.type(off)],
               defines=_defines(dtype, "XENT_THREADS"))
    return loss, lse


def softmax_cross_entropy_backward(logits, labels, lse, gloss, label_smoothing):
    """glogits (N, K) = (softmax - target) * gloss[:, None]; gloss (N,) per-row gradients."""
    dev, dtype = device_for(logits), logits.dtype
    n, k = logits.shape
    logits, labels = dev.input(logits, dtype), dev.input(labels, numpy.int64)
    lse, gloss = dev.input(lse, dtype), dev.input(gloss, dtype)
    on, off = _smoothing(k, label_smoothing)
    gz = dev.empty((n, k), dtype)
    threads = LAUNCH["XENT_THREADS"]
    if n > 65535:
        raise ValueError(f"softmax_cross_entropy_backward handles at most 65535 rows, got {n}")
    dev.launch("softmax_cross_entropy.cu", "softmax_xent_bwd", (-(-k // threads), n), (threads,),
               [logits, labels, lse, gloss, gz, _i32(n), _i32(k), dtype.type(on),
                dtype.type(off)], defines=_defines(dtype, "XENT_THREADS"))
    return gz


def add_relu_forward(a, b):
    """max(a + b, 0) in one pass (a and b of one shape)."""
    dev, dtype = device_for(a), a.dtype
    if a.shape != b.shape:
        raise ValueError(f"add_relu: shapes {a.shape} and {b.shape} differ")
    a, b = dev.input(a, dtype), dev.input(b, dtype)
    y = dev.empty(a.shape, dtype)
    threads = LAUNCH["EW_THREADS"]
    dev.launch("add_relu.cu", "add_relu_fwd", (_blocks(a.size, threads),), (threads,),
               [a, b, y, _i64(a.size)], defines=_defines(dtype, "EW_THREADS"))
    return y


def relu_backward(gy, y):
    """gy where y > 0, else 0: the gradient through ReLU (and through add_relu to a and b)."""
    dev, dtype = device_for(gy), gy.dtype
    gy, y = dev.input(gy, dtype), dev.input(y, dtype)
    gx = dev.empty(gy.shape, dtype)
    threads = LAUNCH["EW_THREADS"]
    dev.launch("add_relu.cu", "relu_bwd", (_blocks(gy.size, threads),), (threads,),
               [gy, y, gx, _i64(gy.size)], defines=_defines(dtype, "EW_THREADS"))
    return gx
