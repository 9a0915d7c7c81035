"""The student: a timm ViT backbone with a ViTDet-style simple feature pyramid and an FPN head.

The backbone is ``timm.create_model(model_name, img_size=img_size, patch_size=patch_size,
num_classes=0)``. Only the **final-layer tokens** feed the head (ViTDet "simple feature
pyramid"): from the final normed token map at stride ``p`` (the patch size) the head builds maps
at strides ``s, 2s, ..., p`` (transposed convolutions, ×2 each; ``s`` = ``head_stride``, ViTDet's
4 by default) and ``2p`` (max-pool), projects each to ``decoder_dim`` with a lateral 1×1
convolution, fuses them top-down (FPN) into the stride-``s`` map (stride ``p`` if ``p < s``),
applies a small conv/GroupNorm/GELU head and upsamples the class logits bilinearly to the input
resolution. Most of the head's cost is its 3×3 convolution at stride ``s``: ``head_stride=8``
with a smaller ``decoder_dim`` is the fast variant (see benchmarks/README.md).

Tensor contract (see DEVELOPERS.md): images are ``float32 (B, 3, H, W)`` RGB in 0..255; the
student normalises internally with the ImageNet mean/std (the values SAM uses).
"""

from __future__ import annotations

import logging
import math
from typing import Mapping, NamedTuple

import timm
import torch
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d
from torch import Tensor, nn

__all__ = ["Student", "StudentInference", "StudentOutput"]

logger = logging.getLogger(__name__)

#: Default stride of the finest pyramid level (ViTDet: 4).
_FINEST_STRIDE = 4


class StudentOutput(NamedTuple):
    """Output of :class:`Student`.

    Attributes:
        logits: ``float32 (B, C, H, W)`` class logits at the input resolution.
        hidden: ``float32 (B, D, H/p, W/p)`` the tokens of block ``hidden_block`` (default: the
            last) through the final norm, as an NCHW map
            (prefix tokens removed); ``D`` is the backbone's embed dim, ``p`` the patch size and
            ``H, W`` the backbone's ``img_size``.
    """

    logits: Tensor
    hidden: Tensor


def _upsample_stage(in_ch: int, n_steps: int) -> tuple[nn.Module, int]:
    """``n_steps`` ×2 transposed convs (ViTDet: LayerNorm2d + GELU between them).

    Returns the module and its output channels (``in_ch // 2**n_steps``).
    """
    if n_steps == 0:
        return nn.Identity(), in_ch
    layers: list[nn.Module] = []
    ch = in_ch
    for i in range(n_steps):
        out = max(ch // 2, 1)
        layers.append(nn.ConvTranspose2d(ch, out, kernel_size=2, stride=2))
        if i < n_steps - 1:
            layers += [LayerNorm2d(out), nn.GELU()]
        ch = out
    return nn.Sequential(*layers), ch


class _SimpleFeaturePyramidFPN(nn.Module):
    """ViTDet simple feature pyramid over one stride-``p`` map + top-down FPN fusion + seg head.

    ``forward(x: (B, E, h, w)) -> (B, num_classes, h * p / s, w * p / s)`` with ``s`` the finest
    stride (4 for ``p >= 4``).
    """

    def __init__(self, embed_dim: int, patch_size: int, decoder_dim: int, num_classes: int,
                 finest_stride: int = _FINEST_STRIDE) -> None:
        super().__init__()
        if patch_size < 1 or patch_size & (patch_size - 1):
            raise ValueError(f"patch_size must be a power of two for the feature pyramid, got {patch_size}")
        if finest_stride < 1 or finest_stride & (finest_stride - 1):
            raise ValueError(f"head_stride must be a power of two, got {finest_stride}")
        n_up = int(math.log2(max(patch_size // finest_stride, 1)))
        self.finest_stride = patch_size // 2**n_up
        # levels ordered fine -> coarse: strides p/2**n_up, ..., p, then 2p (max-pool)
        stages: list[nn.Module] = []
        laterals: list[nn.Module] = []
        for k in range(n_up, -1, -1):
            stage, ch = _upsample_stage(embed_dim, k)
            stages.append(stage)
            laterals.append(nn.Conv2d(ch, decoder_dim, kernel_size=1))
        stages.append(nn.MaxPool2d(kernel_size=2, stride=2))
        laterals.append(nn.Conv2d(embed_dim, decoder_dim, kernel_size=1))
        self.stages = nn.ModuleList(stages)
        self.laterals = nn.ModuleList(laterals)
        self.head = nn.Sequential(
            nn.Conv2d(decoder_dim, decoder_dim, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(math.gcd(32, decoder_dim), decoder_dim),
            nn.GELU(),
            nn.Conv2d(decoder_dim, num_classes, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x: (B, E, h, w)`` stride-p map -> logits ``(B, C, h*p/s, w*p/s)`` at the finest stride."""
        feats = [lat(stage(x)) for stage, lat in zip(self.stages, self.laterals)]
        y = feats[-1]
        for f in reversed(feats[:-1]):  # top-down: coarse -> fine
            y = f + F.interpolate(y, size=f.shape[-2:], mode="nearest")
        return self.head(y)


class Student(nn.Module):
    """timm ViT (default ViT-Tiny) + ViTDet simple-feature-pyramid FPN segmentation head.

    Args:
        num_classes: number of classes ``C`` including the background.
        img_size: square input size of the backbone; other inputs are resized to it and the
            logits are resized back to the input size.
        model_name: timm model name (a ``VisionTransformer``).
        patch_size: patch size ``p`` (power of two); timm builds the patch embedding for it.
        pretrained: load timm's pretrained weights through ``timm.create_model(pretrained=True)``
            (needs the weights in timm's/HF's cache or network access).
        decoder_dim: channels of the FPN laterals and the head.
        head_stride: stride of the head's finest level, where the logits are made (ViTDet: 4;
            8 or 16 = a lighter head whose logits are upsampled further).
        hidden_block: the backbone block whose output tokens are ``hidden`` (0-based; negative
            counts from the end; -1 = the last block, the final encoder hidden state). The final
            norm is applied to it as to the last block (timm's ``forward_intermediates(norm=True)``);
            the head always reads the last block. Only distillation's hidden term uses it.

    ``forward(images: float32 (B, 3, H, W) in 0..255) -> StudentOutput(logits (B, C, H, W),
    hidden (B, D, img_size/p, img_size/p))``.
    """

    def __init__(
        self,
        num_classes: int,
        img_size: int = 256,
        *,
        model_name: str = "vit_tiny_patch16_224",
        patch_size: int = 16,
        pretrained: bool = False,
        decoder_dim: int = 128,
        hidden_block: int = -1,
        head_stride: int = _FINEST_STRIDE,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        self.num_classes = num_classes
        self.img_size = img_size
        self.patch_size = patch_size
        self.backbone = timm.create_model(
            model_name, pretrained=pretrained, img_size=img_size, patch_size=patch_size, num_classes=0
        )
        if not hasattr(self.backbone, "forward_intermediates") or not hasattr(self.backbone, "blocks"):
            raise ValueError(f"{model_name!r} is not a timm ViT with forward_intermediates")
        depth = len(self.backbone.blocks)
        if not -depth <= hidden_block < depth:
            raise ValueError(f"hidden_block {hidden_block} is outside the {depth} blocks of {model_name!r} "
                             f"(allowed: {-depth} .. {depth - 1})")
        self._last_block = depth - 1
        self._hidden_block = hidden_block % depth
        self.decoder = _SimpleFeaturePyramidFPN(self.hidden_dim, patch_size, decoder_dim, num_classes,
                                                finest_stride=head_stride)
        mean = torch.tensor(IMAGENET_DEFAULT_MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(IMAGENET_DEFAULT_STD, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        logger.debug(
            "Student %s img_size=%d patch=%d: %.2fM parameters",
            model_name, img_size, patch_size, sum(p.numel() for p in self.parameters()) / 1e6,
        )

    @property
    def hidden_dim(self) -> int:
        """Backbone embed dim ``D`` (192 for ViT-Tiny)."""
        return int(self.backbone.embed_dim)

    @property
    def logits_stride(self) -> int:
        """``img_size`` / the side of the logits :meth:`features` returns (the head's stride)."""
        return int(self.decoder.finest_stride)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Token grid ``(img_size/p, img_size/p)`` = spatial size of ``hidden``."""
        gh, gw = self.backbone.patch_embed.grid_size
        return int(gh), int(gw)

    def preprocess(self, images: Tensor) -> Tensor:
        """``images: float32 (B, 3, H, W)`` 0..255 -> normalised ``(B, 3, img_size, img_size)``.

        Normalisation and the (antialiased bilinear) resize are both linear per channel, so they
        commute: resizing 0..255 images to ``img_size`` first (as :class:`StudentInference`'s
        callers do) gives the same tensor up to float rounding.
        """
        x = (images.float() - self.pixel_mean) / self.pixel_std
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False,
                              antialias=True)
        return x

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised ``x: (B, 3, img_size, img_size)`` -> (low-res logits ``(B, C, img_size/s,
        img_size/s)`` at the head's finest stride ``s``, hidden ``(B, D, img_size/p, img_size/p)``)."""
        # block tokens through the final norm, prefix tokens removed, as NCHW
        if self._hidden_block == self._last_block:
            (final,) = self.backbone.forward_intermediates(
                x, indices=[self._last_block], norm=True, output_fmt="NCHW", intermediates_only=True
            )
            return self.decoder(final), final
        hidden, final = self.backbone.forward_intermediates(
            x, indices=[self._hidden_block, self._last_block], norm=True, output_fmt="NCHW",
            intermediates_only=True,
        )
        return self.decoder(final), hidden

    def forward(self, images: Tensor) -> StudentOutput:
        """``images: float32 (B, 3, H, W)`` 0..255 -> ``StudentOutput`` (see class docstring)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        out_size = images.shape[-2:]
        logits, hidden = self.features(self.preprocess(images))
        logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        return StudentOutput(logits=logits, hidden=hidden)

    def load_backbone_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load weights into the timm backbone (strict).

        Args:
            state_dict: keys as in ``self.backbone.state_dict()`` (no ``backbone.`` prefix).

        Raises:
            ValueError: naming missing / unexpected keys, or keys whose shapes differ.
        """
        expected = self.backbone.state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        mismatched = sorted(
            k for k in set(expected) & set(state_dict) if tuple(expected[k].shape) != tuple(state_dict[k].shape)
        )
        if missing or unexpected or mismatched:
            parts = []
            if missing:
                parts.append(f"missing keys {missing}")
            if unexpected:
                parts.append(f"unexpected keys {unexpected}")
            if mismatched:
                parts.append(
                    "shape mismatch "
                    + ", ".join(f"{k}: {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}" for k in mismatched)
                )
            raise ValueError("backbone state dict does not match: " + "; ".join(parts))
        self.backbone.load_state_dict(dict(state_dict), strict=True)
        logger.info("loaded %d backbone tensors", len(state_dict))


class StudentInference(nn.Module):
    """The lean inference (and export) path of a student (a :class:`Student` or any model of
    :func:`tskd.models.students.build_student`): no hidden output, no full-resolution upsampling
    inside the graph.

    ``forward(images: float32 (B, 3, img_size, img_size) in 0..255) -> float32 (B, C,
    img_size/s, img_size/s)`` low-res logits (``s`` = ``student.logits_stride``: the ViT head's
    finest stride, 4 by default; 1 for the MONAI U-Nets, whose logits are already full size).
    Callers resize images to ``img_size`` beforehand (antialiased bilinear,
    :func:`tskd.predict.to_model_input`) and upsample the logits bilinearly to each image's own
    size before the argmax: together that is exactly ``student(images).logits`` (up to float
    rounding), with one resize of the image and one of the C-channel logits.
    """

    def __init__(self, student: nn.Module, *, channels_last: bool = False) -> None:
        super().__init__()
        self.student = student
        self.channels_last = channels_last
        if channels_last and isinstance(student, Student):
            # the FPN head's convolutions run ~2x faster NHWC on CPU at 256 px
            self.student.decoder.to(memory_format=torch.channels_last)

    def forward(self, images: Tensor) -> Tensor:
        x = (images - self.student.pixel_mean) / self.student.pixel_std
        logits, _ = self.student.features(x)
        return logits.contiguous()
