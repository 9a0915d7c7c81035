"""The student registry: every architecture tskd can distil into, built from one config.

:func:`build_student` reads ``student.arch`` (see :data:`STUDENT_ARCHS`) and returns a module with
one contract, whatever the architecture::

    forward(images: float32 (B, 3, H, W) in 0..255)
        -> StudentOutput(logits (B, C, H, W) at the input resolution,
                         hidden (B, D, img_size/16, img_size/16))
    .hidden_dim      D, the channels of ``hidden`` (tskd.losses.KDLoss projects D -> teacher dim)
    .input_multiple  img_size must be a multiple of it (checked on the driver by tskd.config)
    .logits_stride   img_size / the side of the logits ``features`` returns (1 = full size)
    .features(x)     normalised (B, 3, img_size, img_size) -> (low-res logits (B, C, img_size /
                     logits_stride, ...), hidden): the lean path tskd.models.student.StudentInference
                     exports (no resize of the logits inside the graph)

Each student normalises the 0..255 input with the ImageNet mean/std, resizes it to its working
size ``img_size`` when it differs, and resizes the logits back to the input size. ``hidden`` is
the student's stride-16 feature map (for ``vit``: the final normed tokens at stride ``patch_size``):

============== ============================================== ==================================
arch           model                                          hidden (stride 16)
============== ============================================== ==================================
``vit``        timm ViT + ViTDet simple-feature-pyramid FPN   final normed tokens (stride = the
               head (:class:`tskd.models.student.Student`)    patch size: 16, or 8 with patch 8)
``timm_unet``  timm encoder (``features_only``, ``encoder``)  the encoder's reduction-16 map
               + MONAI's ``UNetDecoder`` (FlexibleUNet's
               decoder, SMP-style) + a 3×3 conv head
``basic_unet`` MONAI ``BasicUNet`` (default features)         ``down_4`` output (256 channels)
``segresnet``  MONAI ``SegResNet``, 5 levels                  ``down_layers[4]`` output (128 ch.)
               (``blocks_down=(1, 2, 2, 4, 4)``, 8 initial
               filters): MONAI's default has 4 levels and
               no stride-16 map, so tskd adds one
============== ============================================== ==================================
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from tskd.models.student import Student, StudentOutput

__all__ = ["CLASS_WEIGHT_KEYS", "STUDENT_ARCHS", "TIMM_ENCODERS", "StudentOutput", "TimmUNet", "MonaiStudent",
           "build_student"]

logger = logging.getLogger(__name__)

#: Stride of the ``hidden`` map of every non-ViT student.
HIDDEN_STRIDE = 16

TIMM_ENCODERS = ("resnet18", "resnet34", "efficientnet_b0", "efficientnet_b1", "repvit_m0_9",
                 "repvit_m1_1", "mobilevit_xxs", "mobilevit_xs", "convnext_atto")
"""timm encoders of ``timm_unet`` (each has a reduction-16 feature map and at most 32; tested).
RepViT is EdgeSAM's student family, MobileViT a small conv/attention hybrid."""

#: Decoder channels from the coarsest to the finest level (FlexibleUNet's / SMP's default).
_DECODER_CHANNELS = (256, 128, 64, 32, 16)


class _Segmenter(nn.Module):
    """Shared input/output handling: normalise 0..255 input, resize to ``img_size`` and back.

    Subclasses implement ``_forward(x: normalised (B, 3, img_size, img_size)) -> (logits at
    any resolution, hidden)`` and set ``hidden_dim`` and ``input_multiple``.
    """

    hidden_dim: int
    input_multiple: int
    logits_stride: int = 1
    """``img_size`` / the side of the logits :meth:`features` returns."""

    def __init__(self, num_classes: int, img_size: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, "
                             f"got {num_classes}")
        self.num_classes = num_classes
        self.img_size = img_size
        mean = torch.tensor(IMAGENET_DEFAULT_MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(IMAGENET_DEFAULT_STD, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    def _check_size(self) -> None:
        if self.img_size % self.input_multiple:
            raise ValueError(f"img_size {self.img_size} must be a multiple of "
                             f"{self.input_multiple} for {type(self).__name__}")

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised ``x: (B, 3, img_size, img_size)`` -> (logits ``(B, C, img_size / s,
        img_size / s)`` at ``s = logits_stride``, hidden) (as ``Student.features``)."""
        return self._forward(x)

    def forward(self, images: Tensor) -> StudentOutput:
        """``images: float32 (B, 3, H, W)`` 0..255 -> ``StudentOutput(logits (B, C, H, W),
        hidden (B, hidden_dim, img_size/16, img_size/16))``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        out_size = images.shape[-2:]
        x = (images.float() - self.pixel_mean) / self.pixel_std
        if tuple(out_size) != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear",
                              align_corners=False, antialias=True)
        logits, hidden = self._forward(x)
        if logits.shape[-2:] != out_size:
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        return StudentOutput(logits=logits, hidden=hidden)


class TimmUNet(_Segmenter):
    """A timm encoder (``features_only``, random init) with MONAI's U-Net decoder.

    The decoder is ``monai.networks.nets.flexible_unet.UNetDecoder`` (what ``FlexibleUNet`` uses,
    which only accepts MONAI's own backbones) with FlexibleUNet's defaults: one up-block per
    encoder level (nearest upsampling + conv, BatchNorm, ReLU), skips from every level but the
    coarsest, channels ``(256, 128, 64, 32, 16)`` truncated to the number of levels; then a 3×3
    conv to the classes at half the finest encoder stride, upsampled bilinearly.

    Args:
        num_classes: ``C`` including the background.
        img_size: working size (a multiple of the encoder's largest reduction, 32).
        encoder: a timm model name from :data:`TIMM_ENCODERS` (others may work if they have a
            reduction-16 feature map).
    """

    def __init__(self, num_classes: int, img_size: int = 128, *, encoder: str = "resnet18") -> None:
        import timm
        from monai.networks.nets.flexible_unet import UNetDecoder

        super().__init__(num_classes, img_size)
        self.encoder = timm.create_model(encoder, features_only=True, pretrained=False)
        reductions = [int(r) for r in self.encoder.feature_info.reduction()]
        channels = [int(c) for c in self.encoder.feature_info.channels()]
        if HIDDEN_STRIDE not in reductions:
            raise ValueError(f"timm encoder {encoder!r} has no stride-{HIDDEN_STRIDE} feature map "
                             f"(reductions {reductions})")
        self.hidden_index = reductions.index(HIDDEN_STRIDE)
        self.hidden_dim = channels[self.hidden_index]
        self.input_multiple = max(reductions)
        # one x2 up-block per encoder level from the coarsest map
        self.logits_stride = max(max(reductions) // 2 ** len(channels), 1)
        self._check_size()
        decoder_channels = _DECODER_CHANNELS[:len(channels)]
        # encoder_channels[0] stands for the input (UNetDecoder never uses it as a skip)
        self.decoder = UNetDecoder(
            spatial_dims=2, encoder_channels=(3, *channels), decoder_channels=decoder_channels,
            act=("relu", {"inplace": True}), norm=("batch", {"eps": 1e-3, "momentum": 0.1}),
            dropout=0.0, bias=False, upsample="nontrainable", pre_conv="default",
            interp_mode="nearest", align_corners=None, is_pad=True)
        self.skip_connect = len(channels) - 1
        self.head = nn.Conv2d(decoder_channels[-1], num_classes, kernel_size=3, padding=1)

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.encoder(x)
        y = self.decoder(list(features), self.skip_connect)
        return self.head(y), features[self.hidden_index]


class MonaiStudent(_Segmenter):
    """A MONAI 2D segmentation network whose stride-16 map is captured with a forward hook.

    Args:
        net: the network: ``net(x (B, 3, H, W)) -> logits (B, C, H, W)``.
        hidden_module: the sub-module whose output is the stride-16 map (``B, hidden_dim, H/16,
            W/16``).
        hidden_dim: its channels.
    """

    input_multiple = HIDDEN_STRIDE

    def __init__(self, num_classes: int, img_size: int, net: nn.Module, hidden_module: nn.Module,
                 hidden_dim: int) -> None:
        super().__init__(num_classes, img_size)
        self._check_size()
        self.net = net
        self.hidden_dim = hidden_dim
        self._captured: list[Tensor] = []
        # a bound method (not a closure), so copy.deepcopy rebinds the hook to the copy
        hidden_module.register_forward_hook(self._capture)

    def _capture(self, _module: nn.Module, _inputs: Any, output: Tensor) -> None:
        self._captured.append(output)

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._captured.clear()
        logits = self.net(x)
        (hidden,) = self._captured  # exactly one call per forward
        self._captured.clear()
        return logits, hidden


def _build_vit(cfg: Mapping[str, Any], num_classes: int, hidden_block: int = -1) -> nn.Module:
    student = Student(num_classes, cfg["img_size"], model_name=cfg["model_name"],
                      patch_size=cfg["patch_size"], decoder_dim=cfg["decoder_dim"],
                      hidden_block=hidden_block, head_stride=cfg.get("head_stride", 4))
    student.input_multiple = cfg["patch_size"]
    return student


def _build_timm_unet(cfg: Mapping[str, Any], num_classes: int) -> nn.Module:
    return TimmUNet(num_classes, cfg["img_size"], encoder=cfg["encoder"])


def _build_basic_unet(cfg: Mapping[str, Any], num_classes: int) -> nn.Module:
    from monai.networks.nets import BasicUNet

    features = (32, 32, 64, 128, 256, 32)  # MONAI's default
    net = BasicUNet(spatial_dims=2, in_channels=3, out_channels=num_classes, features=features)
    return MonaiStudent(num_classes, cfg["img_size"], net, net.down_4, features[4])


def _build_segresnet(cfg: Mapping[str, Any], num_classes: int) -> nn.Module:
    from monai.networks.nets import SegResNet

    init_filters = 8
    net = SegResNet(spatial_dims=2, in_channels=3, out_channels=num_classes,
                    init_filters=init_filters, blocks_down=(1, 2, 2, 4, 4), blocks_up=(1, 1, 1, 1))
    return MonaiStudent(num_classes, cfg["img_size"], net, net.down_layers[4], init_filters * 16)


_BUILDERS: dict[str, Callable[[Mapping[str, Any], int], nn.Module]] = {
    "vit": _build_vit,
    "timm_unet": _build_timm_unet,
    "basic_unet": _build_basic_unet,
    "segresnet": _build_segresnet,
}
STUDENT_ARCHS = tuple(_BUILDERS)
"""Values of ``student.arch`` (must equal ``tskd.config.STUDENT_ARCHS``; tested)."""

CLASS_WEIGHT_KEYS: dict[str, str] = {
    "vit": "decoder.head.3.weight",
    "timm_unet": "head.weight",
    "basic_unet": "net.final_conv.weight",
    "segresnet": "net.conv_final.2.conv.weight",
}
"""Per arch, the state-dict key of the last convolution's weight, ``(C, ...)``: a saved
student's number of classes (``tskd.predict.load_student_artifact``)."""


def build_student(cfg: Mapping[str, Any], num_classes: int, *, hidden_block: int = -1) -> nn.Module:
    """The student described by ``cfg`` (a ``tskd.config.StudentConfig`` as a dict), random init.

    Args:
        cfg: ``arch`` (a key of :data:`STUDENT_ARCHS`), ``img_size`` and what the arch reads:
            ``vit``: ``model_name``, ``patch_size``, ``decoder_dim``; ``timm_unet``: ``encoder``.
        num_classes: ``C`` including the background.
        hidden_block: ``vit`` only: the ViT block whose tokens are ``hidden`` (-1: the last;
            ``distill.student_block``). Every other arch has one hidden map (stride 16) and
            accepts only -1.

    Returns:
        A module with the contract in the module docstring (``hidden_dim``, ``input_multiple``).

    Raises:
        ValueError: an unknown arch, naming the allowed ones.
    """
    arch = cfg.get("arch", "vit")
    if arch not in _BUILDERS:
        raise ValueError(f"student.arch: invalid value {arch!r}; allowed: one of {list(_BUILDERS)}")
    if arch == "vit":
        model = _build_vit(cfg, num_classes, hidden_block)
    elif hidden_block != -1:
        raise ValueError(f"hidden_block {hidden_block}: student.arch {arch!r} has one hidden map "
                         "(its stride-16 features); only the vit student selects a block")
    else:
        model = _BUILDERS[arch](cfg, num_classes)
    logger.debug("student %s: %.2fM parameters", arch,
                 sum(p.numel() for p in model.parameters()) / 1e6)
    return model
