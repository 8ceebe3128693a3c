"""The ImageNet classifiers HSNet takes its features from, stated here instead of imported from torchvision.

Importing torchvision costs about 1.3 s (its ``ops`` pull in ``torch._dynamo``), as much as torch itself,
and every command paid it for five module definitions. These are torchvision's ResNet-18/34/50/101 (V1.5:
the stride on the 3x3 convolution) and VGG-16 as facts: the same modules under the same attribute names
(so torchvision's and the original HSNet checkpoints' state_dicts load unchanged, and ``repr`` reads the
same), created and initialized in the same order, so that one seed gives the same random weights as
torchvision's constructors. ``tests/test_hsnet.py`` checks all five against torchvision.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["IMAGENET_WEIGHTS_URLS", "ResNet", "BasicBlock", "Bottleneck", "VGG", "make_backbone_net"]

# torchvision's ImageNet V1 weights (IMAGENET1K_V1), the ones the original HSNet was trained from.
IMAGENET_WEIGHTS_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
}


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (resnet18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        # Registration order is torchvision's (it fixes the random initialization's order of draws).
        self.conv1 = _conv(in_channels, channels, 3, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv(channels, channels, 3)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand, and a shortcut (resnet50/101)."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv(in_channels, channels, 1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = _conv(channels, channels, 3, stride)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = _conv(channels, channels * self.expansion, 1)
        self.bn3 = nn.BatchNorm2d(channels * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + shortcut)


class ResNet(nn.Module):
    """Stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool), four stages, global average pool, ``fc`` to 1000."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], blocks_per_stage: tuple[int, int, int, int]):
        super().__init__()
        self.inplanes = 64  # channels entering the next stage (torchvision's attribute)
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._stage(block, 64, blocks_per_stage[0], 1)
        self.layer2 = self._stage(block, 128, blocks_per_stage[1], 2)
        self.layer3 = self._stage(block, 256, blocks_per_stage[2], 2)
        self.layer4 = self._stage(block, 512, blocks_per_stage[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, 1000)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _stage(self, block, channels: int, blocks: int, stride: int) -> nn.Sequential:
        out_channels = channels * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_channels:  # the shortcut must match the block's output
            downsample = nn.Sequential(_conv(self.inplanes, out_channels, 1, stride), nn.BatchNorm2d(out_channels))
        layers = [block(self.inplanes, channels, stride, downsample)]
        self.inplanes = out_channels
        layers += [block(out_channels, channels) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# VGG-16 ("configuration D"): channels of each 3x3 convolution, "M" for a 2x2 max-pool.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """``features`` (3x3 convolutions with ReLU, max-pools), a 7x7 adaptive pool, a 3-layer ``classifier``."""

    def __init__(self, layout=_VGG16_LAYOUT, dropout: float = 0.5):
        super().__init__()
        layers, channels = [], 3
        for entry in layout:
            if entry == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, entry, 3, padding=1), nn.ReLU(inplace=True)]
                channels = entry
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(4096, 1000))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


_RESNETS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet34": (BasicBlock, (3, 4, 6, 3)),
            "resnet50": (Bottleneck, (3, 4, 6, 3)), "resnet101": (Bottleneck, (3, 4, 23, 3))}


def make_backbone_net(name: str) -> nn.Module:
    """A new randomly initialized ``resnet18``/``resnet34``/``resnet50``/``resnet101``/``vgg16``, as
    torchvision's ``torchvision.models.<name>(weights=None)`` makes it."""
    if name == "vgg16":
        return VGG()
    if name not in _RESNETS:
        raise ValueError(f"backbone: unknown backbone {name!r}; expected one of {sorted([*_RESNETS, 'vgg16'])}")
    return ResNet(*_RESNETS[name])
