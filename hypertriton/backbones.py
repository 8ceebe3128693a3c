"""Frozen ImageNet backbones and HSNet's feature extraction.

HSNet correlates intermediate features of a frozen classification network:

- ResNet: the output of every block of layer2, layer3 and layer4, taken after the residual addition
  and BEFORE the block's final ReLU (layer1 is not used). resnet50/101 (Bottleneck blocks) are the
  original's; resnet18/34 (BasicBlock) are small extras for quick CPU experiments.
- VGG16: the outputs of ``features[17, 19, 21]`` (conv4_1..3), ``[24, 26, 28]`` (conv5_1..3), all
  before their ReLU, and ``[30]`` (pool5).

The backbone module is the complete torchvision model (its ``fc``/``classifier`` included, unused),
restated in :mod:`hypertriton.backbone_nets`, so that the original checkpoints' ``backbone.*`` keys
load unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ._io import load_error_summary, load_on_cpu
from ._pickle_guard import UnsafeFileError
from .backbone_nets import IMAGENET_WEIGHTS_URLS, make_backbone_net
from .data.common import IMAGENET_MEAN, IMAGENET_STD  # re-exported: the one definition is the data's
from .ops.cpu_conv import run_conv_module

__all__ = ["BackboneSpec", "BACKBONES", "get_spec", "build_backbone", "extract_features", "freeze",
           "IMAGENET_MEAN", "IMAGENET_STD", "WeightsUnavailableError", "load_imagenet_weights",
           "imagenet_weights_url"]


@dataclass(frozen=True)
class BackboneSpec:
    """What HSNet needs to know about a backbone.

    Attributes:
        name: ``"resnet50"``, ``"resnet101"``, ``"vgg16"``, ``"resnet18"`` or ``"resnet34"``.
        family: ``"resnet"`` or ``"vgg"``; ``"custom"`` for a backbone module of one's own (``HSNet(module,
            spec=...)``), whose forward returns the feature list.
        channels: channels of each extracted feature, shallow to deep.
        layers_per_level: number of features per pyramid level, DEEPEST first: the learner's ``inch``
            and the ``L_p`` of each hypercorrelation level.
        level_strides: image-to-feature downsampling of each level, deepest first (VGG floors, ResNet
            rounds up: ``ceil(H / stride)`` for ResNet, ``H // stride`` for VGG).
        vgg_feat_ids: for VGG, the indices into ``features`` whose outputs are taken.
    """

    name: str
    family: str
    channels: tuple[int, ...]
    layers_per_level: tuple[int, int, int]
    level_strides: tuple[int, int, int]
    vgg_feat_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # A spec of one's own (a subclass with another backbone) that does not add up failed far away, in
        # the pyramid's slicing ("layers -1..0 ... got []").
        if len(self.layers_per_level) != 3 or len(self.level_strides) != 3:
            raise ValueError(f"BackboneSpec {self.name!r}: layers_per_level and level_strides: expected 3 values "
                             f"each (HSNet's learner takes 3 pyramid levels), got {self.layers_per_level} and "
                             f"{self.level_strides}")
        if sum(self.layers_per_level) != len(self.channels) or min(self.layers_per_level) < 1:
            raise ValueError(f"BackboneSpec {self.name!r}: layers_per_level {self.layers_per_level} must be positive "
                             f"and add up to the number of features, len(channels) = {len(self.channels)}")

    @property
    def num_features(self) -> int:
        return len(self.channels)

    def feature_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Spatial size of each level's features for an image of ``height x width``, deepest first."""
        if self.family == "vgg":
            return [(height // s, width // s) for s in self.level_strides]
        sizes = []
        for stride in self.level_strides:
            h, w = height, width
            # conv1 (stride 2), max-pool (stride 2), then one stride-2 conv per stage: each rounds up
            for _ in range(stride.bit_length() - 1):
                h, w = -(-h // 2), -(-w // 2)
            sizes.append((h, w))
        return sizes


def _resnet_spec(name: str, blocks: tuple[int, int, int], expansion: int) -> BackboneSpec:
    channels = tuple(c * expansion for c, n in zip((128, 256, 512), blocks) for _ in range(n))
    return BackboneSpec(name, "resnet", channels, tuple(reversed(blocks)), (32, 16, 8))


BACKBONES: dict[str, BackboneSpec] = {
    "resnet50": _resnet_spec("resnet50", (4, 6, 3), 4),
    "resnet101": _resnet_spec("resnet101", (4, 23, 3), 4),
    "vgg16": BackboneSpec("vgg16", "vgg", (512,) * 7, (1, 3, 3), (32, 16, 8), (17, 19, 21, 24, 26, 28, 30)),
    "resnet18": _resnet_spec("resnet18", (2, 2, 2), 1),
    "resnet34": _resnet_spec("resnet34", (4, 6, 3), 1),
}


def get_spec(name: str) -> BackboneSpec:
    """The :class:`BackboneSpec` of backbone ``name``; ``ValueError`` for an unknown name."""
    if not isinstance(name, str) or name not in BACKBONES:
        # (not the repr of a module passed in: that is pages long)
        given = repr(name) if isinstance(name, str) else f"of type {type(name).__name__}"
        hint = ("; a backbone module of your own goes with its spec: HSNet(module, spec=BackboneSpec(...))"
                if not isinstance(name, str) else "")
        raise ValueError(f"backbone: unknown backbone {given}; expected one of {sorted(BACKBONES)}{hint}")
    return BACKBONES[name]


def imagenet_weights_url(name: str) -> str:
    """URL of torchvision's ImageNet V1 weights for backbone ``name``."""
    return IMAGENET_WEIGHTS_URLS[get_spec(name).name]


def _hub_cache_path(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


class WeightsUnavailableError(RuntimeError):
    """The ImageNet weights are neither given, nor cached, nor downloadable; the message says how to
    provide them."""


def _missing_weights_message(name: str, url: str, reason: str) -> str:
    return (f"pretrained=True: cannot get the ImageNet weights of {name} ({reason}). Provide them in one of "
            f"two ways: (1) put the file {os.path.basename(url)} (from {url}) into torch hub's cache "
            f"directory {_hub_cache_path(url).parent} (set TORCH_HOME to move it), or (2) pass the file's "
            f"path: --backbone-weights PATH on the command line, build_backbone({name!r}, weights=PATH) / "
            f"HSNet({name!r}, backbone_weights=PATH) in Python. Or train from random weights: --no-pretrained "
            "(pretrained=False).")


def _load_weights_file(path: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_on_cpu(path)
    except UnsafeFileError as error:
        raise ValueError(f"weights: {error}") from None
    except Exception as error:  # unpickling, zip and EOF errors all mean "not a weights file"
        raise ValueError(f"weights: {str(path)!r} is not a PyTorch weights file for {name} (torch.load failed: "
                         f"{load_error_summary(error)})") from error


def load_imagenet_weights(name: str, weights: str | os.PathLike | None = None,
                          allow_download: bool = True) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet V1 state_dict for backbone ``name``.

    Looked up, in order: the file ``weights`` if given; torch hub's cache
    (``$TORCH_HOME/hub/checkpoints/<file>``); a download (when ``allow_download``).

    Raises:
        FileNotFoundError: ``weights`` does not exist.
        ValueError: ``weights`` (or the cached file) is no PyTorch file.
        WeightsUnavailableError: the weights are not cached and cannot be downloaded; the message says
            how to provide them.
    """
    url = imagenet_weights_url(name)
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights: no such file {str(path)!r} (expected torchvision's "
                                    f"{os.path.basename(url)} for {name})")
        return _load_weights_file(path, name)
    cached = _hub_cache_path(url)
    if cached.is_file():
        return _load_weights_file(cached, name)
    if not allow_download:
        raise WeightsUnavailableError(_missing_weights_message(name, url, f"{cached} does not exist and "
                                                               "downloading is off"))
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, check_hash=True,
                                                  weights_only=True)  # as every other file hypertriton reads
    except Exception as error:  # URLError, HTTPError, socket errors, hash mismatches: all mean "no file"
        raise WeightsUnavailableError(_missing_weights_message(name, url, f"download failed: {error}")) from error


def freeze(backbone: nn.Module) -> nn.Module:
    """Turn off gradients of every parameter and put ``backbone`` in eval mode (BN statistics fixed)."""
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    return backbone.eval()


def build_backbone(name: str, pretrained: bool = False, weights: str | os.PathLike | None = None,
                   allow_download: bool = True) -> nn.Module:
    """The frozen torchvision model for backbone ``name``.

    Args:
        name: a key of :data:`BACKBONES`.
        pretrained: load torchvision's ImageNet V1 weights (see :func:`load_imagenet_weights`).
        weights: path of a torchvision state_dict file for this backbone; implies ``pretrained``.
        allow_download: whether ``pretrained`` may download the weights when they are not cached.

    Returns:
        The complete model as torchvision builds it (restated in :mod:`hypertriton.backbone_nets`, same
        names and structure; torchvision is not imported), frozen (no gradients, eval mode). Random weights unless
        ``pretrained``/``weights``; under ``torch.device("meta")`` as the default device, a meta model
        (neither read nor drawn).
    """
    spec = get_spec(name)
    if torch.get_default_device().type == "meta":
        # A shape-only model (HSNet.from_checkpoint builds there, then loads every value from its file):
        # no weights read, nothing drawn from the random generator.
        return freeze(make_backbone_net(spec.name))
    if pretrained or weights is not None:
        state_dict = load_imagenet_weights(name, weights, allow_download)
        # built without initialization: every value is overwritten by the file
        with torch.device("meta"):
            model = make_backbone_net(spec.name)
        model = model.to_empty(device="cpu")
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as error:
            source = weights if weights is not None else imagenet_weights_url(name)
            raise ValueError(f"weights: {source} is not a {name} state_dict: {error}") from error
    elif spec.family == "vgg":
        model = _random_vgg()
    else:
        model = make_backbone_net(spec.name)
    return freeze(model)


def _random_vgg() -> nn.Module:
    """A randomly initialized VGG whose unused classifier (123M weights) is zero-filled.

    Drawing the classifier's random weights takes seconds and HSNet never uses them; the convolutions
    get torchvision's initialization (Kaiming normal, fan-out, zero bias).
    """
    with torch.device("meta"):
        model = make_backbone_net("vgg16")
    model = model.to_empty(device="cpu")
    for module in model.features:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    for tensor in model.classifier.parameters():
        nn.init.zeros_(tensor)
    return model


def _resnet_block_pre_relu(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision Bottleneck/BasicBlock's output after the residual add, before its last ReLU."""
    out = F.relu(block.bn1(run_conv_module(block.conv1, x)))
    if hasattr(block, "conv3"):  # Bottleneck
        out = F.relu(block.bn2(run_conv_module(block.conv2, out)))
        out = block.bn3(block.conv3(out))
    else:  # BasicBlock
        out = block.bn2(run_conv_module(block.conv2, out))
    identity = x if block.downsample is None else block.downsample(x)
    return out + identity


def extract_features(backbone: nn.Module, spec: BackboneSpec, img: torch.Tensor) -> list[torch.Tensor]:
    """HSNet's features of ``img`` from ``backbone`` (built by :func:`build_backbone` for ``spec``).

    Runs under whatever grad mode the caller has; :class:`hypertriton.HSNet` calls it under
    ``torch.no_grad()``.

    Args:
        backbone: the torchvision model.
        spec: its :class:`BackboneSpec`.
        img: ``[B, 3, H, W]``, ImageNet-normalized.

    Returns:
        ``spec.num_features`` tensors ``[B, C_l, h_l, w_l]``, shallow to deep.
    """
    if not isinstance(img, torch.Tensor) or img.dim() != 4 or img.shape[1] != 3:
        shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
        raise ValueError(f"img: expected an image batch [B, 3, H, W], got {shape}")
    if spec.family == "custom":  # a module of one's own gives the list itself
        feats = backbone(img)
        if not isinstance(feats, (list, tuple)) or len(feats) != spec.num_features:
            got = f"{len(feats)} tensors" if isinstance(feats, (list, tuple)) else type(feats).__name__
            raise ValueError(f"backbone {spec.name!r}: its forward must return a list of {spec.num_features} "
                             f"feature maps (its spec's channels {list(spec.channels)}), got {got}")
        return list(feats)
    feats = []
    if spec.family == "vgg":
        wanted = set(spec.vgg_feat_ids)
        feat = img
        for index, module in enumerate(backbone.features[: max(wanted) + 1]):
            # torchvision's ReLUs are in-place; a non-in-place ReLU keeps the taken conv output intact
            feat = F.relu(feat) if isinstance(module, nn.ReLU) else run_conv_module(module, feat)
            if index in wanted:
                feats.append(feat)
        return feats
    feat = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(img))))
    for stage in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
        for block in stage:
            out = _resnet_block_pre_relu(block, feat)
            if stage is not backbone.layer1:
                feats.append(out)
            feat = F.relu(out)
    return feats
