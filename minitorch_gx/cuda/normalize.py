"""Launcher of ``kernels/normalize.cu``: the training input, uint8 NHWC images
to normalised float NCHW in one pass; called by ``resnext.transforms.normalize``.
"""
import numpy

from .device import LAUNCH, blocks as _blocks, defines as _defines, device_for

_i64 = numpy.int64


def normalize_images(images, mean, std, dtype):
    """(images - 255 mean) / (255 std) per channel, (N, H, W, 3) uint8 ->
    (N, 3, H, W) ``dtype`` in CNHW memory (a transposed view of a contiguous
    (3, N, H, W) array: the GPU path's layout). ``mean`` and ``std``: 3
    numbers each, multiplied by 255 in ``dtype`` as the reference does."""
    dev, dtype = device_for(images), numpy.dtype(dtype)
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != numpy.uint8:
        raise ValueError(f"normalize: expected uint8 (N, H, W, 3), got {images.dtype} "
                         f"{tuple(images.shape)}")
    n, h, w, _ = images.shape
    if n > 65535:
        raise ValueError(f"normalize: at most 65535 images per launch, got {n}")
    images = dev.input(images, numpy.uint8)
    memory = dev.empty((3, n, h, w), dtype)
    real = dtype.type
    means = [real(m) * real(255) for m in mean]
    stds = [real(s) * real(255) for s in std]
    threads = LAUNCH["EW_THREADS"]
    if n and h * w:
        dev.launch("normalize.cu", "normalize_u8_nhwc", (_blocks(h * w, threads), n), (threads,),
                   [images, memory, *means, *stds, _i64(h * w)],
                   defines=_defines(dtype, "EW_THREADS"))
        dev.check_written(memory)
    return memory.transpose(1, 0, 2, 3)
