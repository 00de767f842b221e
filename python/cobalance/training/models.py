"""Segmentation models from a string-keyed factory.

Two families:

- ``"unet"``: a U-Net written in plain PyTorch with small encoders that train on a
  CPU (``encoder="conv-tiny"``, ``"conv-small"``, ``"resnet-tiny"``, ``"resnet-small"``).
- ``"smp-unet"`` / ``"smp-unet-xception65"``: ``segmentation_models_pytorch.Unet``; the
  second is the method's configuration (the timm ``xception65`` encoder). They need the
  ``training`` extra (segmentation-models-pytorch and timm) and fail with an
  ``ImportError`` saying so when it is missing.

Encoder weights are never downloaded: pass ``encoder_weights_path`` to load a local
state dict into the encoder.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["create_model", "list_models", "list_encoders", "UNet"]


# -- the plain-PyTorch U-Net ------------------------------------------------------------


class _ConvBlock(nn.Sequential):
    """Two 3x3 conv + batch norm + ReLU layers."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        )


class _ResidualBlock(nn.Module):
    """A ResNet basic block (two 3x3 convs and a projected shortcut when shapes differ)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x), inplace=True)


class ConvEncoder(nn.Module):
    """Plain conv encoder: a conv block per stage, 2x2 max pooling between stages.

    ``forward`` returns the feature map of every stage, finest first; stage ``s`` has
    ``widths[s]`` channels at ``1 / 2**s`` of the input resolution.
    """

    def __init__(self, in_channels: int, widths: Sequence[int]):
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        chans = (in_channels,) + self.widths
        self.stages = nn.ModuleList(_ConvBlock(chans[i], chans[i + 1]) for i in range(len(self.widths)))

    def forward(self, x):
        features = []
        for i, stage in enumerate(self.stages):
            if i:
                x = F.max_pool2d(x, 2)
            x = stage(x)
            features.append(x)
        return features


class ResNetEncoder(nn.Module):
    """Small ResNet-style encoder: a 3x3 stem, then a stride-2 residual stage per level.

    ``forward`` returns the feature map of every stage, finest first, like
    :class:`ConvEncoder`.
    """

    def __init__(self, in_channels: int, widths: Sequence[int], blocks_per_stage: int = 1):
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, self.widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(self.widths[0]), nn.ReLU(inplace=True),
                                  _ResidualBlock(self.widths[0], self.widths[0]))
        self.stages = nn.ModuleList()
        for i in range(1, len(self.widths)):
            blocks = [_ResidualBlock(self.widths[i - 1], self.widths[i], stride=2)]
            blocks += [_ResidualBlock(self.widths[i], self.widths[i]) for _ in range(blocks_per_stage - 1)]
            self.stages.append(nn.Sequential(*blocks))

    def forward(self, x):
        x = self.stem(x)
        features = [x]
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class UNet(nn.Module):
    """U-Net over an encoder that returns one feature map per resolution level.

    The decoder upsamples with 2x2 transposed convolutions (deterministic on CUDA,
    unlike bilinear upsampling's backward) and concatenates the skip connection.
    Inputs whose height or width is not a multiple of ``2 ** (levels - 1)`` are
    zero-padded and the logits cropped back, so any tile size works.

    Parameters
    ----------
    encoder : nn.Module
        Has a ``widths`` attribute (channels per level, finest first).
    classes : int
        Output channels (logits).
    """

    def __init__(self, encoder: nn.Module, classes: int):
        super().__init__()
        self.encoder = encoder
        widths = list(encoder.widths)
        self.levels = len(widths)
        self.up = nn.ModuleList()
        self.decode = nn.ModuleList()
        for i in range(self.levels - 1, 0, -1):
            self.up.append(nn.ConvTranspose2d(widths[i], widths[i - 1], 2, stride=2))
            self.decode.append(_ConvBlock(2 * widths[i - 1], widths[i - 1]))
        self.head = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        m = 2 ** (self.levels - 1)
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        features = self.encoder(x)
        y = features[-1]
        for up, decode, skip in zip(self.up, self.decode, reversed(features[:-1])):
            y = decode(torch.cat([up(y), skip], dim=1))
        return self.head(y)[..., :h, :w]


# -- registries --------------------------------------------------------------------------

_ENCODERS: Dict[str, Callable[[int], nn.Module]] = {
    "conv-tiny": lambda c: ConvEncoder(c, (8, 16, 32, 64)),
    "conv-small": lambda c: ConvEncoder(c, (16, 32, 64, 128, 256)),
    "resnet-tiny": lambda c: ResNetEncoder(c, (16, 32, 64, 128)),
    "resnet-small": lambda c: ResNetEncoder(c, (32, 64, 128, 256, 512), blocks_per_stage=2),
}

# name -> (builder, default encoder)
_SMP_INSTALL_HINT = (
    "segmentation-models-pytorch and timm (which imports torchvision): install the "
    "training extra, `pip install 'cobalance[training]'` with a torchvision matching your "
    "torch, or use create_model('unet', encoder=...) whose encoders need only torch"
)


def _import_smp():
    try:
        import segmentation_models_pytorch as smp
    except Exception as err:  # timm raises ModuleNotFoundError for torchvision, or others
        raise ImportError(f"the 'smp-unet' models need {_SMP_INSTALL_HINT} (import failed: {err})") from err
    return smp


def _build_unet(in_channels: int, classes: int, encoder: str) -> nn.Module:
    if encoder not in _ENCODERS:
        raise ValueError(f"encoder must be one of {sorted(_ENCODERS)} for model 'unet', got {encoder!r}")
    return UNet(_ENCODERS[encoder](in_channels), classes)


def _build_smp_unet(in_channels: int, classes: int, encoder: str) -> nn.Module:
    smp = _import_smp()
    # encoder_weights=None: smp would otherwise download ImageNet weights.
    return smp.Unet(encoder_name=encoder, encoder_weights=None, in_channels=in_channels, classes=classes)


_MODELS: Dict[str, Tuple[Callable[[int, int, str], nn.Module], str]] = {
    "unet": (_build_unet, "conv-tiny"),
    "smp-unet": (_build_smp_unet, "tu-xception65"),
    # The method's configuration: U-Net with the timm Xception-65 encoder.
    "smp-unet-xception65": (_build_smp_unet, "tu-xception65"),
}


def list_models() -> list:
    """Names accepted by :func:`create_model`."""
    return sorted(_MODELS)


def list_encoders() -> list:
    """Encoders of the plain-PyTorch ``"unet"`` (``"smp-unet"`` takes smp's encoder names)."""
    return sorted(_ENCODERS)


def _init_head_prior(model: nn.Module, classes: int, prior: float) -> None:
    """Set the bias of the output convolution (the last Conv2d with ``classes`` outputs) to
    ``log(prior / (1 - prior))``, as Lin et al. (2017) start a detector: every class
    starts predicted near ``prior``."""
    heads = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels == classes]
    if not heads or heads[-1].bias is None:
        raise ValueError("head_prior needs an output convolution with a bias and one channel per class")
    with torch.no_grad():
        heads[-1].bias.fill_(float(np.log(prior / (1.0 - prior))))


def create_model(name: str, *, in_channels: int = 3, classes: int, encoder: Optional[str] = None,
                 encoder_weights_path=None, head_prior: Optional[float] = None) -> nn.Module:
    """Build a segmentation model that outputs ``classes`` logit channels.

    Parameters
    ----------
    name : str
        One of :func:`list_models`: ``"unet"`` (plain PyTorch), ``"smp-unet"`` or
        ``"smp-unet-xception65"`` (segmentation_models_pytorch; the latter is the
        method's configuration and accepts no other encoder).
    in_channels : int
        Input channels (3 for RGB).
    classes : int
        Output channels.
    encoder : str, optional
        ``"unet"``: one of :func:`list_encoders` (default ``"conv-tiny"``);
        ``"smp-unet"``: any smp encoder name (default ``"tu-xception65"``).
    encoder_weights_path : path, optional
        A local file holding the encoder's state dict (``torch.save(model.encoder.state_dict())``
        or a dict with a ``"state_dict"`` entry), loaded strictly. Nothing is ever
        downloaded; without it the encoder starts from random weights.
    head_prior : float in (0, 1), optional
        Start every class's sigmoid near this probability: the output layer's bias is set
        to ``log(p / (1 - p))`` (the prior initialisation of Lin et al., 2017, for rare
        positives). None: PyTorch's default initialisation.

    Returns
    -------
    torch.nn.Module
        ``model(x)`` maps a float batch ``(B, in_channels, H, W)`` to logits
        ``(B, classes, H, W)``; the encoder is ``model.encoder``.

    Raises
    ------
    ValueError
        Unknown model or encoder name (the message lists the valid ones), non-positive
        ``in_channels`` / ``classes``, a missing weights file, or weights that do not fit.
    ImportError
        An ``smp-`` model without segmentation_models_pytorch / timm importable.
    """
    if name not in _MODELS:
        raise ValueError(f"name must be one of {list_models()}, got {name!r}")
    if head_prior is not None and not (isinstance(head_prior, (int, float)) and 0.0 < head_prior < 1.0):
        raise ValueError(f"head_prior must be a probability in (0, 1) or None, got {head_prior!r}")
    for arg, value in (("in_channels", in_channels), ("classes", classes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    builder, default_encoder = _MODELS[name]
    if encoder is None:
        encoder = default_encoder
    elif name == "smp-unet-xception65" and encoder != default_encoder:
        raise ValueError(f"model 'smp-unet-xception65' uses encoder {default_encoder!r}, got "
                         f"encoder={encoder!r}; use 'smp-unet' for another encoder")
    weights = None
    if encoder_weights_path is not None:
        path = os.fspath(encoder_weights_path)
        if not os.path.isfile(path):
            raise ValueError(f"encoder_weights_path {path!r} is not a file (weights are never downloaded)")
        weights = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(weights, dict) and "state_dict" in weights and isinstance(weights["state_dict"], dict):
            weights = weights["state_dict"]
    model = builder(in_channels, classes, encoder)
    if weights is not None:
        try:
            model.encoder.load_state_dict(weights, strict=True)
        except RuntimeError as err:
            raise ValueError(f"encoder_weights_path {os.fspath(encoder_weights_path)!r} does not fit "
                             f"encoder {encoder!r}: {err}") from err
    if head_prior is not None:
        _init_head_prior(model, classes, float(head_prior))
    return model
