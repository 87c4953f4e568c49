"""ResNeXt (Xie et al., "Aggregated Residual Transformations for Deep Neural
Networks", 2017), laid out exactly as torchvision's ``resnext50_32x4d`` so that
state_dicts move between the two unchanged.

    stem:    conv1 7x7/2 (3->64), bn1, relu, maxpool 3x3/2
    layer1..layer4: [3, 4, 6, 3] Bottleneck blocks, outputs 256, 512, 1024, 2048
    head:    global average pool, fc 2048 -> num_classes

A Bottleneck is 1x1 conv (reduce to `width`), 3x3 grouped conv (`groups`
groups of `width_per_group * planes/64` channels), 1x1 conv (expand to
4*planes), each followed by batch norm; ReLU after the first two and after the
residual add. A stage's stride sits on the 3x3 conv of its first block, whose
shortcut is 1x1 conv (stride) + BN (``downsample``).
"""
import numpy

from minitorch_gx import functional as F
from minitorch_gx import nn

EXPANSION = 4


class Bottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride=1, groups=32, width_per_group=4,
                 base_planes=64, downsample=None):
        super().__init__()
        width = int(planes * (width_per_group / base_planes)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * EXPANSION)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn1(self.conv1(x), relu=True)   # BN and ReLU fused in one op
        out = self.bn2(self.conv2(out), relu=True)
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.add_relu(out, identity)  # the residual add and its ReLU in one op


class ResNeXt(nn.Module):
    """ResNeXt with torchvision's module names.

    layers:          blocks per stage, [3, 4, 6, 3] for ResNeXt50
    groups:          cardinality C (32)
    width_per_group: channels per group at the first stage (4), doubling per stage
    base_planes:     planes of the first stage (64); smaller values give the
                     reduced-width models used in tests and the demo
    zero_init_residual: start the last BN gamma of every block at 0, so each
                     block starts as the identity (the original recipe does)
    """

    def __init__(self, layers=(3, 4, 6, 3), groups=32, width_per_group=4, num_classes=1000,
                 base_planes=64, zero_init_residual=True, seed=None):
        super().__init__()
        self.groups, self.width_per_group, self.base_planes = groups, width_per_group, base_planes
        self.inplanes = base_planes
        self.conv1 = nn.Conv2d(3, base_planes, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_planes)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(base_planes, layers[0], stride=1)
        self.layer2 = self._make_layer(base_planes * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(base_planes * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(base_planes * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(base_planes * 8 * EXPANSION, num_classes)
        del self.inplanes
        self.reset_parameters(zero_init_residual, seed)

    def _make_layer(self, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * EXPANSION:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * EXPANSION, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * EXPANSION))
        kw = dict(groups=self.groups, width_per_group=self.width_per_group,
                  base_planes=self.base_planes)
        blocks_ = [Bottleneck(self.inplanes, planes, stride, downsample=downsample, **kw)]
        self.inplanes = planes * EXPANSION
        blocks_ += [Bottleneck(self.inplanes, planes, **kw) for _ in range(1, blocks)]
        return nn.Sequential(*blocks_)

    def reset_parameters(self, zero_init_residual=True, seed=None):
        """The original's initialisation: Kaiming normal (fan_out, relu) for
        convolutions, BN gamma 1 and beta 0, the final BN of each block at 0 if
        ``zero_init_residual``; the fc layer keeps PyTorch's default uniform."""
        rng = numpy.random.default_rng(seed)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", rng=rng)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1.0)
                nn.init.constant_(m.bias, 0.0)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / numpy.sqrt(m.in_features)
                nn.init.uniform_(m.weight, -bound, bound, rng=rng)
                nn.init.uniform_(m.bias, -bound, bound, rng=rng)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0.0)

    def forward(self, x):
        x = self.bn1(self.conv1(x), relu=True)
        x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = F.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnext50_32x4d(num_classes=1000, zero_init_residual=True, seed=None):
    """ResNeXt-50 (32x4d): 25,028,904 parameters at 1000 classes."""
    return ResNeXt((3, 4, 6, 3), groups=32, width_per_group=4, num_classes=num_classes,
                   zero_init_residual=zero_init_residual, seed=seed)


def resnext_mini(num_classes=10, zero_init_residual=True, seed=None):
    """A reduced-width ResNeXt built by the same code (blocks [1, 1, 1, 1], 8
    groups, 16 base planes): for quick demos and end-to-end tests on a CPU."""
    return ResNeXt((1, 1, 1, 1), groups=8, width_per_group=4, num_classes=num_classes,
                   base_planes=16, zero_init_residual=zero_init_residual, seed=seed)


ARCHITECTURES = {"resnext50_32x4d": resnext50_32x4d, "resnext_mini": resnext_mini}


def build_model(arch, num_classes, zero_init_residual=True, seed=None):
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](num_classes=num_classes, zero_init_residual=zero_init_residual,
                               seed=seed)
