"""Crop sampling, reduced-size JPEG decoding, flip, colour jitter, eval geometry, normalize."""
import numpy as np
import pytest
from PIL import Image, ImageEnhance, JpegImagePlugin

from minitorch_gx import backend
from resnext import transforms as T
from tests.backends import KERNEL_IMPLEMENTATIONS, host, launch_shapes, run_on


def _smooth_image(width, height):
    """A smooth colourful uint8 image (JPEG-friendly), (height, width, 3)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 127 + 100 * np.sin(x / 37.0) * np.cos(y / 53.0)
    g = 255 * x / (width - 1)
    b = 255 * y / (height - 1)
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "big.JPEG"
    Image.fromarray(_smooth_image(1600, 1200)).save(path, quality=95)
    return path


# ---------------------------------------------------------------------------
# crop box sampling (torchvision's RandomResizedCrop.get_params)
# ---------------------------------------------------------------------------
def test_crop_boxes_fit_and_respect_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(300):
        W = int(rng.integers(200, 2000))
        H = int(W * rng.uniform(0.2, 5.0))  # aspect ratios up to 5:1 either way
        top, left, h, w = T.sample_crop_box(W, H, rng)
        assert 0 <= top and top + h <= H and 0 <= left and left + w <= W and h > 0 and w > 0
        # Accepted draws and the fallback both keep w/h within the range (up to rounding).
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
        assert w * h >= 0.07 * W * H


def test_crop_box_distribution_matches_torchvision():
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision.transforms")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    W, H = 500, 375
    dummy = torch.zeros(3, H, W)
    theirs = np.array([tv.RandomResizedCrop.get_params(dummy, [0.08, 1.0], [3 / 4, 4 / 3])
                       for _ in range(3000)], dtype=float)
    ours = np.array([T.sample_crop_box(W, H, rng) for _ in range(3000)], dtype=float)
    # Compare quantiles of the box height/width fractions and centre position.
    for feature in (lambda t: t[:, 2] / H, lambda t: t[:, 3] / W,
                    lambda t: (t[:, 1] + t[:, 3] / 2) / W):
        qa = np.quantile(feature(ours), [0.1, 0.25, 0.5, 0.75, 0.9])
        qb = np.quantile(feature(theirs), [0.1, 0.25, 0.5, 0.75, 0.9])
        assert np.abs(qa - qb).max() < 0.04, (qa, qb)


@pytest.mark.parametrize("W,H,expected", [
    (100, 10, (0, 43, 10, 13)),  # too wide: full height, w = round(10 * 4/3)
    (10, 100, (43, 0, 13, 10)),  # too tall: full width, h = round(10 / (3/4))
    (50, 40, (0, 0, 40, 50)),    # ratio within range: the whole image
])
def test_fallback_is_the_centred_box(W, H, expected):
    # scale > 1 can never fit, so all 10 tries fail and the fallback is used.
    assert T.sample_crop_box(W, H, np.random.default_rng(1), scale=(2.0, 3.0)) == expected


# ---------------------------------------------------------------------------
# random resized crop, with and without reduced-size JPEG decoding
# ---------------------------------------------------------------------------
def test_random_resized_crop_matches_crop_then_resize(tmp_path):
    image = _smooth_image(300, 200)
    path = tmp_path / "a.png"  # lossless: the reference sees the same pixels
    Image.fromarray(image).save(path)
    for seed in range(5):
        out = T.random_resized_crop(path, 48, np.random.default_rng(seed))
        top, left, h, w = T.sample_crop_box(300, 200, np.random.default_rng(seed))
        crop = Image.fromarray(np.ascontiguousarray(image[top:top + h, left:left + w]))
        ref = np.asarray(crop.resize((48, 48), Image.BILINEAR)).astype(int)
        assert out.shape == (48, 48, 3) and out.dtype == np.uint8
        # Pillow's box resize may read a pixel or two beyond the crop for its
        # filter; inside, the two must agree.
        assert np.abs(out[3:-3, 3:-3].astype(int) - ref[3:-3, 3:-3]).max() <= 1


def test_draft_is_used_for_large_jpeg_and_matches_full_decode(big_jpeg, monkeypatch):
    calls = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = real_draft(self, mode, size)
        calls.append((size, self.size))  # requested size, decoded size
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    # Whole-image crop of a 1600x1200 JPEG to 64 px: decoding at 1/8 is plenty.
    whole = dict(scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3))
    fast = T.random_resized_crop(big_jpeg, 64, np.random.default_rng(0), **whole)
    assert calls and calls[-1][1] == (200, 150)
    full = T.random_resized_crop(big_jpeg, 64, np.random.default_rng(0), draft=False, **whole)
    assert np.abs(fast.astype(int) - full).mean() < 1.5

    # Random crops: drafted and full decodes agree closely.
    for seed in range(4):
        fast = T.random_resized_crop(big_jpeg, 112, np.random.default_rng(seed))
        full = T.random_resized_crop(big_jpeg, 112, np.random.default_rng(seed), draft=False)
        assert np.abs(fast.astype(int) - full).mean() < 1.5

    # A crop smaller than twice the output keeps the full resolution: no draft.
    calls.clear()
    T.random_resized_crop(big_jpeg, 224, np.random.default_rng(0), scale=(0.02, 0.02))
    assert calls == []


def test_train_augment_is_deterministic_under_a_seed(big_jpeg):
    a = T.train_augment(big_jpeg, 64, np.random.default_rng(7))
    b = T.train_augment(big_jpeg, 64, np.random.default_rng(7))
    c = T.train_augment(big_jpeg, 64, np.random.default_rng(8))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_horizontal_flip():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    flips = 0
    for seed in range(200):
        out = T.horizontal_flip(image, np.random.default_rng(seed))
        flipped = np.random.default_rng(seed).random() < 0.5
        assert np.array_equal(out, image[:, ::-1] if flipped else image)
        flips += flipped
    assert 70 < flips < 130


# ---------------------------------------------------------------------------
# colour jitter, against Pillow's ImageEnhance (what torchvision uses on images)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,enhancer,tol", [
    ("brightness", ImageEnhance.Brightness, 1),
    ("saturation", ImageEnhance.Color, 1),
    ("contrast", ImageEnhance.Contrast, 2),  # Pillow rounds the mean to an integer
])
@pytest.mark.parametrize("factor", [0.6, 0.93, 1.4])
def test_each_colour_adjustment_matches_pillow(name, enhancer, tol, factor):
    image = np.random.default_rng(0).integers(0, 256, size=(17, 23, 3), dtype=np.uint8)
    ours = T.adjust_colors(image, [(name, factor)]).astype(int)
    ref = np.asarray(enhancer(Image.fromarray(image)).enhance(factor)).astype(int)
    assert np.abs(ours - ref).max() <= tol


def test_jitter_params_order_and_range():
    orders = set()
    for seed in range(100):
        ops = T.jitter_params(np.random.default_rng(seed))
        assert sorted(n for n, _ in ops) == ["brightness", "contrast", "saturation"]
        assert all(0.6 <= f <= 1.4 for _, f in ops)
        orders.add(tuple(n for n, _ in ops))
    assert len(orders) == 6  # every order occurs


def test_color_jitter_is_the_drawn_adjustments():
    image = np.random.default_rng(1).integers(0, 256, size=(8, 9, 3), dtype=np.uint8)
    ops = T.jitter_params(np.random.default_rng(3))
    assert np.array_equal(T.color_jitter(image, np.random.default_rng(3)), T.adjust_colors(image, ops))


# ---------------------------------------------------------------------------
# eval geometry
# ---------------------------------------------------------------------------
def _ramp_png(tmp_path, width, height):
    """R encodes x, G encodes y, linearly (bilinear resizing keeps linear ramps)."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 / (width - 1), y * 255 / (height - 1), np.zeros_like(x)], -1)
    path = tmp_path / "ramp.png"
    Image.fromarray(np.rint(image).astype(np.uint8)).save(path)
    return path


@pytest.mark.parametrize("mode,resized,offset", [
    ("square", (256, 256), (16, 16)),   # the original code: 256x256, crop at 16
    ("shorter", (512, 256), (144, 16)),  # torchvision: 300x150 -> 512x256, crop at (144, 16)
])
def test_eval_resize_geometry(tmp_path, mode, resized, offset):
    W, H = 300, 150
    out = T.resize_center_crop(_ramp_png(tmp_path, W, H), 224, mode=mode).astype(float)
    assert out.shape == (224, 224, 3)
    # Output pixel (r, c) samples source point ((c + dx + .5) * W / W' - .5, same for y).
    r, c = np.mgrid[0:224, 0:224]
    src_x = (c + offset[0] + 0.5) * W / resized[0] - 0.5
    src_y = (r + offset[1] + 0.5) * H / resized[1] - 0.5
    inner = (slice(2, -2), slice(2, -2))
    assert np.abs(out[..., 0] - src_x * 255 / (W - 1))[inner].max() < 1.5
    assert np.abs(out[..., 1] - src_y * 255 / (H - 1))[inner].max() < 1.5


def test_eval_other_sizes_keep_the_256_224_ratio(tmp_path):
    path = _ramp_png(tmp_path, 300, 150)
    assert T.resized_shape(300, 150, 128, "shorter") == (256, 128)
    out = T.resize_center_crop(path, 112, mode="square")  # resize 128, crop 112
    ref = np.asarray(Image.open(path).resize((128, 128), Image.BILINEAR))[8:120, 8:120]
    assert np.array_equal(out, ref)


@pytest.mark.parametrize("mode", ["square", "shorter"])
def test_eval_draft_matches_full_decode(big_jpeg, mode):
    fast = T.resize_center_crop(big_jpeg, 224, mode=mode)
    full = T.resize_center_crop(big_jpeg, 224, mode=mode, draft=False)
    assert fast.shape == full.shape == (224, 224, 3)
    assert np.abs(fast.astype(int) - full).mean() < 1.5


@pytest.mark.parametrize("mode,fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG")])
def test_other_colour_modes_come_out_rgb(tmp_path, mode, fmt):
    # ImageNet holds some grayscale and CMYK JPEGs (and a PNG named .JPEG).
    rgb = Image.fromarray(_smooth_image(600, 450))
    path = tmp_path / "x.JPEG"
    rgb.convert(mode).save(path, format=fmt)
    ref = np.asarray(Image.open(path).convert("RGB").resize((256, 256), Image.BILINEAR))[16:240, 16:240]
    out = T.resize_center_crop(path, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - ref).mean() < 2
    assert T.train_augment(path, 32, np.random.default_rng(0)).shape == (32, 32, 3)


def test_unreadable_file_raises_a_decode_error(tmp_path):
    bad = tmp_path / "bad.JPEG"
    good = tmp_path / "good.JPEG"
    Image.fromarray(_smooth_image(64, 48)).save(good)
    bad.write_bytes(good.read_bytes()[:200])  # truncated
    with pytest.raises(T.DECODE_ERRORS):
        T.resize_center_crop(bad, 32)
    bad.write_bytes(b"this is no image")
    with pytest.raises(T.DECODE_ERRORS):
        T.train_augment(bad, 32, np.random.default_rng(0))


# ---------------------------------------------------------------------------
# normalize
# ---------------------------------------------------------------------------
def _backends():
    from minitorch_gx.backend import cupy
    yield pytest.param(np, id="numpy")
    yield pytest.param(cupy, id="cupy", marks=pytest.mark.skipif(cupy is None, reason="no CuPy"))


@pytest.mark.parametrize("xp", list(_backends()))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_normalize_against_loops(xp, dtype):
    images = np.random.default_rng(0).integers(0, 256, size=(2, 5, 4, 3), dtype=np.uint8)
    out = xp.asarray(T.normalize(xp.asarray(images), xp, dtype))
    assert out.transpose(1, 0, 2, 3).flags.c_contiguous  # CNHW memory, which later ops keep
    out = out.get() if hasattr(out, "get") else out
    assert out.shape == (2, 3, 5, 4) and out.dtype == dtype
    ref = np.empty((2, 3, 5, 4))
    for n in range(2):
        for ch in range(3):
            for y in range(5):
                for x in range(4):
                    ref[n, ch, y, x] = ((images[n, y, x, ch] - 255 * T.IMAGENET_MEAN[ch])
                                        / (255 * T.IMAGENET_STD[ch]))
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("impl", ["fast"] + KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [256, 64])
@pytest.mark.parametrize("shape", [(3, 7, 5, 3), (1, 1, 1, 3), (2, 20, 13, 3)])
def test_the_normalize_kernel_is_bit_identical_to_the_reference(impl, dtype, threads, shape):
    images = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    images[0, 0, 0] = (0, 255, 128)
    expected = T.normalize_reference(images, np, dtype)
    with run_on(impl) as dev, launch_shapes(EW_THREADS=threads):
        out = T.normalize(dev(images), backend.get_array_module(dev(images)), dtype)
    assert out.transpose(1, 0, 2, 3).flags.c_contiguous  # CNHW memory, both paths' layout
    out = host(out)
    assert out.dtype == dtype and out.shape == expected.shape
    assert np.array_equal(out, expected)
