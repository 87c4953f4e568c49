"""Image decoding and augmentation for ResNeXt training and evaluation.

Everything here works on uint8 HWC RGB arrays, decoded with Pillow; all
randomness comes from a ``numpy.random.Generator`` the caller passes in, so a
seed fixes the output.

train: ``train_augment`` = ``random_resized_crop`` (torchvision's crop sampling)
       + horizontal flip (p=0.5) + colour jitter (brightness, contrast,
       saturation 0.4, in random order, no hue).
eval:  ``resize_center_crop``: resize (to a square, as the original MindSpore
       code does, or the shorter side, as torchvision does), then a centre crop.
both:  ``normalize`` turns a uint8 NHWC batch into float NCHW on the device.

Large JPEGs are decoded at reduced size when the output allows it: libjpeg can
skip most of the inverse DCT and return the image scaled by 1/2, 1/4 or 1/8
(Pillow's ``Image.draft``), which is several times faster than a full decode.
We only ask for a reduction that keeps at least as many pixels as the final
resize needs, so the bilinear resize after it still only shrinks.

Unreadable files: only the decoding of a file (opening it, reading its
header, decompressing its pixels, converting them to RGB) can raise
``UnreadableImage`` (the one member of ``DECODE_ERRORS``), with the reason
kept. An exception raised by the crop, resize or colour arithmetic (a size of
0, an empty scale range) is a bug in the caller or here, and propagates as it
is: the loader must not count it as a damaged image.
"""
import contextlib
import math
import os
import struct

import numpy as np
from PIL import Image

from minitorch_gx import backend
from minitorch_gx.cuda import normalize as cuda_normalize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R 601-2 luma, the weights Pillow's convert("L") and torchvision use.
_GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class UnreadableImage(OSError):
    """A file that could not be decoded as an image.

    ``path``: the file; ``reason``: why, e.g. ``"UnidentifiedImageError: cannot
    identify image file"`` or ``"OSError: image file is truncated (3 bytes not
    processed)"``."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


# What "this file is not a readable image" is (the loader counts and skips such
# files); anything else is a bug and should surface.
DECODE_ERRORS = (UnreadableImage,)

# What Pillow raises for a file it cannot decode: UnidentifiedImageError (an
# OSError) when it recognises no format, OSError for a truncated or damaged
# stream (and a file that cannot be opened at all), DecompressionBombError for
# a header claiming too many pixels, and SyntaxError, EOFError, ValueError or
# struct.error from the format plugins for a malformed header or tile. They
# count as "unreadable" only when raised while decoding (inside ``_decoding``).
_PIL_FILE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, struct.error,
                    Image.DecompressionBombError)


def _reason(error, src):
    """``"<ExceptionType>: <message>"``, without the file's name repeated in it."""
    text = str(error)
    if isinstance(src, (str, os.PathLike)):
        for name in (repr(src), repr(os.fspath(src)), os.fspath(src)):  # quoted forms first
            text = text.replace(name, "")
    text = text.strip().rstrip(":").strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextlib.contextmanager
def _decoding(src):
    """Turn a decoding failure of Pillow's into ``UnreadableImage(src, reason)``.
    Wraps decoding only, never the arithmetic on the decoded image."""
    try:
        yield
    except _PIL_FILE_ERRORS as e:
        path = os.fspath(src) if isinstance(src, (str, os.PathLike)) else repr(src)
        raise UnreadableImage(path, _reason(e, src)) from e


def _open(src):
    """``Image.open(src)`` (the header only; pixels are decoded by ``_decode``)."""
    with _decoding(src):
        return Image.open(src)


def _decode(img, src, need_w, need_h, draft):
    """Decode the pixels of an opened image (at reduced size when a JPEG allows
    it, see ``_open_reduced``) as RGB. Returns (rgb image, fx, fy)."""
    with _decoding(src):
        fx, fy = _open_reduced(img, need_w, need_h, draft)
        img.load()
        return _rgb(img), fx, fy


def sample_crop_box(width, height, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Crop ``(top, left, h, w)`` for a random resized crop, torchvision's algorithm.

    Up to 10 tries: pick an area fraction in ``scale`` and a log-uniform aspect
    ratio (w/h) in ``ratio``; accept the first box that fits in the image and
    place it uniformly. If none fits, fall back to the largest centred box whose
    aspect ratio lies in ``ratio``. (Algorithm of torchvision's
    ``RandomResizedCrop.get_params``.)
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _open_reduced(img, need_w, need_h, draft=True):
    """Ask a JPEG decoder for the smallest DCT-scaled version with >= need_w x need_h
    pixels over the full image. Returns the (x, y) factors mapping original
    coordinates to the decoded image (1.0 when nothing was reduced)."""
    width, height = img.size
    if draft and img.format == "JPEG" and width >= 2 * need_w and height >= 2 * need_h:
        # Pillow picks the largest s in {8,4,2,1} with s <= min(W // need_w, H // need_h),
        # so the reduced image keeps at least need_w x need_h pixels.
        got = img.draft("RGB", (max(1, need_w), max(1, need_h)))
        if got is not None:
            box = got[1]  # where the original image lies in the reduced one
            return box[2] / width, box[3] / height
    return 1.0, 1.0


def _rgb(img):
    return img if img.mode == "RGB" else img.convert("RGB")


def random_resized_crop(src, size, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), draft=True):
    """Decode ``src`` (a path or file), crop a random box and resize it to ``size`` x ``size``.

    The box is drawn with ``sample_crop_box`` on the full image size (read from
    the header before decoding). If the box is at least twice ``size`` in both
    directions, a JPEG is decoded at reduced size and the box is rescaled to it.
    Resampling is bilinear (with Pillow's antialiasing when shrinking).
    Returns uint8 (size, size, 3).
    """
    with _open(src) as img:
        width, height = img.size
        top, left, h, w = sample_crop_box(width, height, rng, scale, ratio)
        # Decoding at 1/s keeps the box at >= size pixels when W*size/w pixels
        # remain over the full width, and likewise for the height.
        rgb, fx, fy = _decode(img, src, math.ceil(width * size / w),
                              math.ceil(height * size / h), draft)
        box = (left * fx, top * fy, (left + w) * fx, (top + h) * fy)
        out = rgb.resize((size, size), Image.BILINEAR, box=box)
        return np.asarray(out, dtype=np.uint8)


def horizontal_flip(image, rng, p=0.5):
    """Mirror an HWC image left-right with probability ``p`` (always draws one number)."""
    return image[:, ::-1] if rng.random() < p else image


def _gray(x):
    """Luma of float HWC RGB: (H, W)."""
    return x @ _GRAY_WEIGHTS


def jitter_params(rng, brightness=0.4, contrast=0.4, saturation=0.4):
    """torchvision ColorJitter's draw, without hue: the three adjustments in a random
    order, each with a factor uniform in [1 - strength, 1 + strength].
    Returns [(name, factor), ...]."""
    names = ("brightness", "contrast", "saturation")
    order = rng.permutation(3)
    factors = rng.uniform([1 - brightness, 1 - contrast, 1 - saturation],
                          [1 + brightness, 1 + contrast, 1 + saturation])
    return [(names[k], float(factors[k])) for k in order]


def adjust_colors(image, ops):
    """Apply ``[(name, factor), ...]`` to uint8 HWC, in order, as torchvision/Pillow define them.

    Each op blends the image x with a "degenerate" image d as ``d + f * (x - d)``
    and clips to [0, 255]: brightness: d = black; contrast: d = the mean luma
    of the image; saturation: d = the per-pixel luma (grayscale image).
    Unlike torchvision we keep float between the steps and round once at the end.
    """
    x = image.astype(np.float32)
    for name, factor in ops:
        f = np.float32(factor)
        if name == "brightness":
            d = np.float32(0)
        elif name == "contrast":
            d = _gray(x).mean(dtype=np.float32)
        elif name == "saturation":
            d = _gray(x)[:, :, None]  # (H, W, 1)
        else:
            raise ValueError(f"unknown colour adjustment {name!r}")
        x -= d  # in place: x = d + f * (x - d)
        x *= f
        x += d
        np.clip(x, 0, 255, out=x)
    return np.rint(x).astype(np.uint8)


def color_jitter(image, rng, brightness=0.4, contrast=0.4, saturation=0.4):
    """Random brightness, contrast and saturation (no hue) like torchvision's ColorJitter."""
    return adjust_colors(image, jitter_params(rng, brightness, contrast, saturation))


def train_augment(src, size, rng, draft=True, scale=(0.08, 1.0)):
    """The training recipe: random resized crop (area fraction ``scale``), flip
    p=0.5, colour jitter 0.4. uint8 (size, size, 3)."""
    image = random_resized_crop(src, size, rng, scale=scale, draft=draft)
    image = horizontal_flip(image, rng)
    return color_jitter(image, rng)


def resized_shape(width, height, resize, mode):
    """(new_w, new_h) of the eval resize: "square" -> resize x resize (aspect ratio
    not kept, the original code); "shorter" -> shorter side = resize (torchvision)."""
    if mode == "square":
        return resize, resize
    if mode == "shorter":
        if width <= height:
            return resize, int(resize * height / width)
        return int(resize * width / height), resize
    raise ValueError(f"eval resize mode must be 'square' or 'shorter', got {mode!r}")


def resize_center_crop(src, size=224, resize=None, mode="square", draft=True):
    """Eval transform: resize (see ``resized_shape``) then crop the centre ``size`` x ``size``.

    resize: default ``round(size * 256 / 224)`` (256 for 224).
    The centre crop offset is ``round((new - size) / 2)`` as in torchvision.
    A large JPEG is decoded at reduced size (never below the resized shape).
    Returns uint8 (size, size, 3).
    """
    if resize is None:
        resize = int(round(size * 256 / 224))
    if resize < size:
        raise ValueError(f"eval resize ({resize}) must be >= crop size ({size})")
    with _open(src) as img:
        width, height = img.size
        new_w, new_h = resized_shape(width, height, resize, mode)
        img, fx, fy = _decode(img, src, new_w, new_h, draft)
        img = img.resize((new_w, new_h), Image.BILINEAR, box=(0, 0, width * fx, height * fy))
        top = int(round((new_h - size) / 2))
        left = int(round((new_w - size) / 2))
        img = img.crop((left, top, left + size, top + size))
        return np.asarray(img, dtype=np.uint8)


def normalize(images, xp=np, dtype=np.float32):
    """uint8 NHWC batch -> float (N, 3, H, W) ``(x - 255 * mean) / (255 * std)``, ImageNet mean/std.

    Meant to run on the device after the (4x smaller) uint8 batch was copied
    there: pass ``xp`` = numpy or cupy. The result is in CNHW memory, the
    layout every later op of the NumPy and the GPU paths then keeps (a 1x1
    convolution is one GEMM over the batch there); the values are
    ``normalize_reference``'s to the bit. With the CUDA kernels in use (a GPU,
    or ``backend.emulate_kernels()``) one kernel does it.
    """
    x = xp.asarray(images)
    if x.ndim != 4 or x.shape[3] != 3:
        raise ValueError(f"normalize expects uint8 (N, H, W, 3), got shape {tuple(x.shape)}")
    return backend.choose(x, reference=normalize_reference, fast=_normalize_fast,
                          kernel=_normalize_kernel)(x, xp, dtype)


def normalize_reference(x, xp, dtype):
    x = xp.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(dtype)  # (N, 3, H, W)
    mean = xp.asarray(IMAGENET_MEAN, dtype=dtype).reshape(1, 3, 1, 1) * 255
    std = xp.asarray(IMAGENET_STD, dtype=dtype).reshape(1, 3, 1, 1) * 255
    x -= mean
    x /= std
    return x


def _normalize_fast(x, xp, dtype):
    """normalize_reference's arithmetic, written into CNHW memory."""
    n, h, w, _ = x.shape
    out = xp.empty((3, n, h, w), dtype)
    out[...] = x.transpose(3, 0, 1, 2)                       # (3, N, H, W), as dtype
    out -= xp.asarray(IMAGENET_MEAN, dtype=dtype).reshape(3, 1, 1, 1) * 255
    out /= xp.asarray(IMAGENET_STD, dtype=dtype).reshape(3, 1, 1, 1) * 255
    return out.transpose(1, 0, 2, 3)                         # (N, 3, H, W) in CNHW memory


def _normalize_kernel(x, xp, dtype):
    return cuda_normalize.normalize_images(x.astype(np.uint8, copy=False), IMAGENET_MEAN,
                                           IMAGENET_STD, dtype)
