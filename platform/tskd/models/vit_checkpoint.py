"""Load a pre-trained ViT (e.g. ImageNet MAE ViT-Tiny) into the student's timm backbone.

Two layouts are read:

- **timm**: a plain state dict with timm's ``VisionTransformer`` names (``cls_token``,
  ``pos_embed``, ``patch_embed.proj.weight``, ``blocks.0.attn.qkv.weight``, ``norm.weight``, and
  possibly ``head.*``), or such a dict under ``state_dict`` / ``model``. The official MAE
  checkpoints (``{"model": {...}}``) use these names too, plus their decoder.
- **MAE-lite** (``{"model": {"module.model.blocks.0.attn.qkv.weight": ...}}``): the same names
  behind ``module.`` / ``model.`` prefixes (``encoder.`` and ``backbone.`` are stripped too).

The MAE decoder (``decoder_*``, ``mask_token``) and classification heads (``head.*``,
``fc_norm.*``) are dropped. Where the checkpoint's patch grid or patch size does not fit the
student (another input size or patch size), ``pos_embed`` / ``patch_embed.proj.weight`` are
either resampled (``mismatch="interpolate"``: timm's ``resample_abs_pos_embed``, bicubic over the
grid with the class token kept; ``resample_patch_embed``, FlexiViT's pseudo-inverse resize) or
left at the student's random init (``mismatch="skip"``, the paper's "did not load the first
layer of tokens"). :class:`LoadReport` says which keys went which way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from torch import Tensor, nn

__all__ = ["CheckpointMismatch", "LoadReport", "load_vit_checkpoint", "read_vit_state_dict",
           "vit_state_dict_into"]

log = logging.getLogger(__name__)

_PREFIXES = ("module.", "model.", "encoder.", "backbone.")
_DROPPED = ("decoder", "mask_token", "head.", "fc_norm.")
#: Keys that may be resampled (interpolate) or left at init (skip) when their shapes differ.
RESAMPLABLE = ("pos_embed", "patch_embed.proj.weight")


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the backbone (missing keys, other widths or depths)."""


@dataclass
class LoadReport:
    """What :func:`vit_state_dict_into` did with each key.

    Attributes:
        loaded: backbone keys copied as they were.
        interpolated: keys resampled to the backbone's shape: name -> "old shape -> new shape".
        skipped: backbone keys left at their initial values: name -> why.
        dropped: checkpoint keys not used (decoder, heads, anything else not in the backbone).
    """

    loaded: list[str] = field(default_factory=list)
    interpolated: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"loaded": len(self.loaded), "interpolated": dict(self.interpolated),
                "skipped": dict(self.skipped), "dropped": list(self.dropped)}

    def summary(self) -> str:
        """One log line."""
        parts = [f"{len(self.loaded)} tensors loaded"]
        if self.interpolated:
            parts.append("interpolated " + ", ".join(f"{k} ({v})" for k, v in
                                                     self.interpolated.items()))
        if self.skipped:
            parts.append("skipped " + ", ".join(f"{k} ({v})" for k, v in self.skipped.items()))
        parts.append(f"{len(self.dropped)} checkpoint keys dropped")
        return "; ".join(parts)


def read_vit_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The ViT tensors of a checkpoint file, with timm's key names (prefixes stripped,
    decoder/head keys kept: :func:`vit_state_dict_into` drops them).

    Raises:
        CheckpointMismatch: the file holds no state dict of tensors.
    """
    state: Any = torch.load(Path(path), map_location="cpu", weights_only=True)
    return normalise_keys(state, str(path))


def normalise_keys(state: Any, source: str = "checkpoint") -> dict[str, Tensor]:
    """Unwrap ``model`` / ``state_dict`` / ``model_state`` and strip leading ``module.``,
    ``model.``, ``encoder.``, ``backbone.`` prefixes from every key."""
    for key in ("model", "state_dict", "model_state"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not state or not all(
            isinstance(v, Tensor) for v in state.values()):
        raise CheckpointMismatch(f"{source}: not a ViT state dict (expected a mapping of tensors, "
                                 "possibly under 'model' or 'state_dict')")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        name = str(key)
        while name.startswith(_PREFIXES):
            name = name.split(".", 1)[1]
        out[name] = value
    return out


def vit_state_dict_into(backbone: nn.Module, state: Mapping[str, Tensor], *,
                        mismatch: Literal["interpolate", "skip"] = "interpolate",
                        source: str = "checkpoint") -> LoadReport:
    """Copy ``state`` (timm names) into the timm ``VisionTransformer`` ``backbone``.

    Raises:
        CheckpointMismatch: a backbone key is missing from ``state``, or a key other than
            :data:`RESAMPLABLE` has another shape (e.g. a ViT-Small checkpoint for ViT-Tiny).
    """
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    report = LoadReport()
    target = backbone.state_dict()
    report.dropped = sorted(k for k in state if k not in target)
    unknown = [k for k in report.dropped if not k.startswith(_DROPPED)]
    if unknown:
        log.warning("%s: %d keys are not part of the student's ViT and are ignored: %s", source,
                    len(unknown), unknown[:5])
    missing = sorted(k for k in target if k not in state)
    if missing:
        raise CheckpointMismatch(f"{source}: the student's ViT needs keys the checkpoint lacks: "
                                 f"{missing[:6]}{' ...' if len(missing) > 6 else ''}")
    new: dict[str, Tensor] = {}
    for key, want in target.items():
        have = state[key]
        if tuple(have.shape) == tuple(want.shape):
            new[key] = have.to(want.dtype)
            report.loaded.append(key)
            continue
        change = f"{tuple(have.shape)} -> {tuple(want.shape)}"
        if key not in RESAMPLABLE:
            raise CheckpointMismatch(f"{source}: {key} has shape {tuple(have.shape)}, the "
                                     f"student's ViT {tuple(want.shape)} (another model width or "
                                     "depth?)")
        if mismatch == "skip":
            report.skipped[key] = f"shape {change}, left at the student's initialisation"
            new[key] = want
        elif key == "pos_embed":
            if have.shape[-1] != want.shape[-1]:
                raise CheckpointMismatch(f"{source}: pos_embed width {have.shape[-1]} differs "
                                         f"from the student's {want.shape[-1]}")
            prefix = 0 if getattr(backbone, "no_embed_class", False) else int(
                backbone.num_prefix_tokens)
            grid = [int(g) for g in backbone.patch_embed.grid_size]
            new[key] = resample_abs_pos_embed(have.float(), new_size=grid,
                                              num_prefix_tokens=prefix).to(want.dtype)
            report.interpolated[key] = change
        else:  # patch_embed.proj.weight: (D, 3, p, p) for another patch size p
            if have.shape[:2] != want.shape[:2]:
                raise CheckpointMismatch(f"{source}: {key} has shape {tuple(have.shape)}, the "
                                         f"student's ViT {tuple(want.shape)}")
            new[key] = resample_patch_embed(have.float(), list(want.shape[-2:])).to(want.dtype)
            report.interpolated[key] = change
    backbone.load_state_dict(new, strict=True)
    return report


def load_vit_checkpoint(backbone: nn.Module, path: str | Path, *,
                        mismatch: Literal["interpolate", "skip"] = "interpolate") -> LoadReport:
    """:func:`read_vit_state_dict` then :func:`vit_state_dict_into`; logs the report."""
    report = vit_state_dict_into(backbone, read_vit_state_dict(path), mismatch=mismatch,
                                 source=str(path))
    log.info("%s: %s", path, report.summary())
    return report
