"""resnext50_32x4d: size, torchvision's state_dict layout, a forward pass, and
end-to-end gradient checks of a block and of a reduced-width model."""
import numpy
import pytest

import minitorch_gx as mt
from minitorch_gx.gradcheck import gradcheck
from resnext.model import Bottleneck, ResNeXt, resnext50_32x4d


@pytest.fixture(scope="module")
def model():
    return resnext50_32x4d(seed=0)


def expected_layout():
    """Names and shapes of torchvision's resnext50_32x4d, written from the
    recipe's description (not from our model code)."""
    out = []

    def conv(name, o, i, k):
        out.append((f"{name}.weight", (o, i, k, k)))

    def bn(name, c):
        out.extend([(f"{name}.weight", (c,)), (f"{name}.bias", (c,)),
                    (f"{name}.running_mean", (c,)), (f"{name}.running_var", (c,)),
                    (f"{name}.num_batches_tracked", ())])

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    inplanes = 64
    for stage, (blocks, width, outc) in enumerate(zip([3, 4, 6, 3], [128, 256, 512, 1024],
                                                      [256, 512, 1024, 2048]), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            conv(f"{p}.conv1", width, inplanes if b == 0 else outc, 1)
            bn(f"{p}.bn1", width)
            conv(f"{p}.conv2", width, width // 32, 3)
            bn(f"{p}.bn2", width)
            conv(f"{p}.conv3", outc, width, 1)
            bn(f"{p}.bn3", outc)
            if b == 0:
                conv(f"{p}.downsample.0", outc, inplanes, 1)
                bn(f"{p}.downsample.1", outc)
        inplanes = outc
    out += [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]
    return out


def test_parameter_count(model):
    assert sum(p.size for p in model.parameters()) == 25_028_904


def test_state_dict_names_and_shapes_match_torchvision_layout(model):
    state = model.state_dict()
    assert len(state) == 320
    assert [(k, tuple(v.shape)) for k, v in state.items()] == expected_layout()
    assert sum(1 for _ in model.parameters()) == 161


def test_state_dict_matches_torchvision_itself(model):
    models = pytest.importorskip("torchvision.models")
    tv = models.resnext50_32x4d().state_dict()
    assert list(tv) == list(model.state_dict())
    for k, v in tv.items():
        assert tuple(v.shape) == model.state_dict()[k].shape, k


def test_initialisation_follows_the_recipe(model):
    w = model.layer3[0].conv1.weight.data
    fan_out = w.shape[0] * w.shape[2] * w.shape[3]
    assert abs(w.std() - numpy.sqrt(2.0 / fan_out)) < 0.05 * numpy.sqrt(2.0 / fan_out)
    assert numpy.all(model.layer2[1].bn3.weight.data == 0)     # zero-init residual
    assert numpy.all(model.layer2[1].bn2.weight.data == 1)
    assert numpy.all(model.layer2[0].downsample[1].weight.data == 1)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_gives_finite_logits(model, mode):
    x = numpy.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(numpy.float32)
    getattr(model, mode)()
    with mt.no_grad():
        y = model(mt.Tensor(x))
    assert y.shape == (2, 1000) and y.dtype == numpy.float32
    assert numpy.all(numpy.isfinite(y.data))
    model.train()


def test_state_dict_round_trip_is_exact(model):
    other = resnext50_32x4d(seed=1)
    other.load_state_dict(model.state_dict())
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert a.dtype == b.dtype and numpy.array_equal(a, b), k


def test_bottleneck_gradcheck_with_downsample_and_groups():
    rng = numpy.random.default_rng(0)
    down = mt.nn.Sequential(mt.nn.Conv2d(6, 16, 1, stride=2, bias=False), mt.nn.BatchNorm2d(16))
    block = Bottleneck(6, 4, stride=2, groups=2, width_per_group=2, base_planes=4, downsample=down)
    block.to(numpy.float64)
    for m in block.modules():  # random BN affine so no gradient path is trivially zero
        if isinstance(m, mt.nn.BatchNorm2d):
            m.weight.data[...] = rng.uniform(0.5, 1.5, m.weight.shape)
            m.bias.data[...] = rng.uniform(-0.5, 0.5, m.bias.shape)
    x = mt.Tensor(rng.standard_normal((3, 6, 7, 5)), requires_grad=True)
    gradcheck(block, [x], wrt=[x] + list(block.parameters()), atol=1e-6, rtol=1e-4)


def test_reduced_resnext_gradcheck_end_to_end():
    rng = numpy.random.default_rng(1)
    net = ResNeXt((1, 1, 1, 1), groups=2, width_per_group=2, num_classes=3, base_planes=4,
                  zero_init_residual=False, seed=0).to(numpy.float64)
    x = mt.Tensor(rng.standard_normal((3, 3, 19, 17)), requires_grad=True)
    labels = numpy.array([0, 2, 1])

    def loss(inp):
        return mt.functional.cross_entropy(net(inp), labels, label_smoothing=0.1)

    gradcheck(loss, [x], wrt=[x] + list(net.parameters()), directions=2, atol=1e-7, rtol=1e-4)
