"""LoRA for the SAM teacher: q and v only, in the image encoder and the mask decoder.

Core layer: plain torch + peft.

* Image encoder: each attention block has one fused ``qkv`` Linear (dim → 3·dim, rows q|k|v).
  peft cannot restrict an adapter to output slices, so :class:`QVLoRALinear` (SAMed style) wraps
  the Linear and adds low-rank deltas to the q and v slices only; the k slice is untouched.
* Mask decoder, by :attr:`LoraSpec.decoder` (``teacher.decoder`` in the config):

  - ``full`` (default, as SAMed's code does it: it freezes only the image encoder): every weight
    of the mask decoder on the prompt-free path is trained, plus the prompt encoder's
    ``no_mask_embed`` (the dense embedding added to the image embedding);
  - ``lora``: peft's ``inject_adapter_in_model`` adds ``lora.Linear`` layers to the decoder's
    ``q_proj``/``v_proj`` in place (the module tree stays a plain ``MaskDecoder``), and the
    class-specific parts are trained in full: the mask tokens and the hypernetwork MLPs (a class
    SAM's checkpoint has no token for starts from a random init and must learn);
  - ``frozen``: the decoder keeps the foundation model's weights.

  In every mode the weights that never receive a gradient without prompts stay frozen, so that
  DDP finds no unused parameters: the IoU prediction head (its output is not used), and the
  hypernetwork MLP of mask token 0 (SAM's single-mask output, dropped with
  ``multimask_output=True``). See :data:`DECODER_MODES`.

Trainable parameters per adapted Linear (in → out): ``r · (in + out)``. For vit_b's encoder that is
``2 · r · (768 + 768) = 3072 · r`` per block (147,456 for r = 4 over 12 blocks); the decoder's
q/v adapters at r = 4 add 23,552. A ``full`` vit_b decoder adds about 4.1M trained weights.

What an adaptation trained — the adapters and, where the decoder is trained, its weights — is
:func:`lora_state_dict`; it is the adapter file's content, loads back exactly with
:func:`load_lora_state_dict` and merges with :func:`merge_lora`.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from tskd.models.sam import SamSegmenter, ValueFn

__all__ = [
    "LoraSpec",
    "QVLoRALinear",
    "apply_lora",
    "count_trainable",
    "has_lora",
    "is_lora_param",
    "load_lora",
    "load_lora_state_dict",
    "DECODER_MODES",
    "is_trained_decoder_param",
    "lora_state_dict",
    "merge_lora",
    "plan_merged_lora",
    "state_dict_mb",
    "save_lora",
]

logger = logging.getLogger(__name__)

_FILE_FORMAT = "tskd-lora"
_FILE_VERSION = 1
#: peft regex (matched against names inside ``sam.mask_decoder``) for the decoder q/v projections.
DECODER_TARGET_MODULES = r"transformer\..*\.(q_proj|v_proj)"
DECODER_MODES = ("full", "lora", "frozen")
"""How the mask decoder is adapted (see the module docstring)."""

_DEC = "sam.mask_decoder."
#: Decoder weights off the prompt-free path: they never receive a gradient.
_NEVER_TRAINED = (_DEC + "iou_prediction_head.", _DEC + "output_hypernetworks_mlps.0.")
_CLASS_PARTS = (_DEC + "mask_tokens.", _DEC + "output_hypernetworks_mlps.")


def is_trained_decoder_param(name: str, mode: str) -> bool:
    """Whether the base (non-adapter) weight ``name`` of a :class:`SamSegmenter` is trained in
    decoder ``mode`` (names as in ``segmenter.named_parameters()``, e.g.
    ``sam.mask_decoder.mask_tokens.weight``)."""
    if is_lora_param(name) or name.startswith(_NEVER_TRAINED):
        return False
    if mode == "full":
        return name.startswith(_DEC) or name == "sam.prompt_encoder.no_mask_embed.weight"
    if mode == "lora":
        return name.startswith(_CLASS_PARTS)
    return False


@dataclass
class LoraSpec:
    """Where and how big the adapters are. ``alpha=None`` means ``alpha = rank`` (scale 1)."""

    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    encoder: bool = True
    decoder: str = "full"
    """``full`` | ``lora`` | ``frozen``: see :data:`DECODER_MODES`."""

    @property
    def scale(self) -> float:
        """alpha / rank."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be None or > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.decoder not in DECODER_MODES:
            raise ValueError(f"LoRA decoder mode must be one of {DECODER_MODES}, got {self.decoder!r}")
        if not self.encoder and self.decoder == "frozen":
            raise ValueError("LoraSpec adapts nothing: set encoder and/or a decoder mode other "
                             "than 'frozen'")


class QVLoRALinear(nn.Module):
    """A fused qkv ``nn.Linear`` (in → 3·dim) with LoRA deltas on its q and v output slices.

    ``forward(x (..., in)) → (..., 3·dim)`` = ``base(x) + [Δq, 0, Δv]`` with
    ``Δq = B_q A_q dropout(x) · alpha/rank`` (same for v). ``B`` starts at zero, so a fresh adapter
    changes nothing. The base Linear is kept as ``self.base`` (frozen by :func:`apply_lora`).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if base.out_features % 3:
            raise ValueError(f"fused qkv Linear needs out_features divisible by 3, got {base.out_features}")
        self.base = base
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / rank
        self.dim = base.out_features // 3
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A_q = nn.Linear(base.in_features, rank, bias=False, **kw)
        self.lora_B_q = nn.Linear(rank, self.dim, bias=False, **kw)
        self.lora_A_v = nn.Linear(base.in_features, rank, bias=False, **kw)
        self.lora_B_v = nn.Linear(rank, self.dim, bias=False, **kw)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for a in (self.lora_A_q, self.lora_A_v):  # as peft: kaiming-uniform A, zero B
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        for b in (self.lora_B_q, self.lora_B_v):
            nn.init.zeros_(b.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        h = self.lora_dropout(x)
        dq = self.lora_B_q(self.lora_A_q(h)) * self.scale
        dv = self.lora_B_v(self.lora_A_v(h)) * self.scale
        zeros = torch.zeros_like(dq)
        return out + torch.cat([dq, zeros, dv], dim=-1)

    def delta_weight(self) -> Tensor:
        """The (3·dim, in) weight delta: rows [B_q A_q; 0; B_v A_v] · alpha/rank."""
        d = self.dim
        delta = torch.zeros_like(self.base.weight)
        delta[:d] = self.lora_B_q.weight @ self.lora_A_q.weight * self.scale
        delta[2 * d :] = self.lora_B_v.weight @ self.lora_A_v.weight * self.scale
        return delta

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """Add the q/v deltas into ``base.weight`` and return the (plain) base Linear."""
        self.base.weight += self.delta_weight()
        return self.base


def is_lora_param(name: str) -> bool:
    """True for adapter parameters (ours and peft's): a dotted component starting with ``lora_``."""
    return any(part.startswith("lora_") for part in name.split("."))


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` carries adapters (encoder wrappers or peft layers)."""
    return any(isinstance(m, (QVLoRALinear, BaseTunerLayer)) for m in model.modules())


def _unwrap(model: nn.Module) -> nn.Module:
    """The wrapped model of DDP / DataParallel / a DeepSpeed engine (anything with ``.module``)."""
    while not isinstance(model, SamSegmenter) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _spec_of(model: nn.Module) -> LoraSpec | None:
    spec = getattr(model, "lora_spec", None)
    return spec if isinstance(spec, LoraSpec) else None


def apply_lora(model: SamSegmenter, spec: LoraSpec | None = None) -> SamSegmenter:
    """Add q/v LoRA adapters to ``model`` in place and freeze every weight the spec does not train.

    Encoder: every ``image_encoder.blocks[i].attn.qkv`` becomes a :class:`QVLoRALinear`.
    Decoder (``spec.decoder``): ``lora`` puts peft ``lora.Linear`` on every ``q_proj``/``v_proj``
    of the mask decoder's transformer and trains the mask tokens and hypernetwork MLPs; ``full``
    trains the decoder's weights; ``frozen`` trains nothing there. Afterwards exactly the adapter
    parameters and the trained decoder weights have ``requires_grad=True``. The spec is kept on
    ``model.lora_spec``. Returns ``model``.
    """
    spec = spec or LoraSpec()
    spec.validate()
    if has_lora(model):
        raise ValueError("model already carries LoRA adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    sam = model.sam
    if spec.encoder:
        for block in sam.image_encoder.blocks:
            attn = block.attn
            if not isinstance(attn.qkv, nn.Linear):
                raise TypeError(f"expected nn.Linear qkv, got {type(attn.qkv).__name__}")
            attn.qkv = QVLoRALinear(attn.qkv, spec.rank, spec.alpha, spec.dropout)
    if spec.decoder == "lora":
        config = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.rank if spec.alpha is None else spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=DECODER_TARGET_MODULES,
            bias="none",
        )
        inject_adapter_in_model(config, sam.mask_decoder)
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_param(name) or is_trained_decoder_param(name, spec.decoder))
    model.lora_spec = spec
    logger.info("applied LoRA %s: %d trainable parameters", spec, count_trainable(model))
    return model


def _is_adapted(name: str, spec: LoraSpec | None) -> bool:
    return is_lora_param(name) or (spec is not None and is_trained_decoder_param(name, spec.decoder))


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """What the adaptation trains: adapter weights and, where the spec trains the decoder, its
    weights (names as in the unwrapped model's ``state_dict()``), detached CPU tensors.

    A DDP/DeepSpeed wrapper is unwrapped first, so the keys never carry a ``module.`` prefix.
    """
    model = _unwrap(model)
    spec = _spec_of(model)
    return {
        k: v.detach().cpu().clone() for k, v in model.state_dict().items() if _is_adapted(k, spec)
    }


def state_dict_mb(state_dict: Mapping[str, Tensor]) -> float:
    """Size of the tensors of ``state_dict`` in MiB (the adapter file's payload)."""
    return sum(t.numel() * t.element_size() for t in state_dict.values()) / 2**20


def load_lora_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], *, source: str = "<state dict>") -> None:
    """Copy what an adaptation trained (see :func:`lora_state_dict`) into a model with the same
    adapters applied; exact key and shape match.

    Unlike ``load_state_dict(strict=False)`` this raises ``ValueError`` (naming ``source``) when any
    adapter key is missing, unexpected or of another shape.
    """
    model = _unwrap(model)
    spec = _spec_of(model)
    own = {k: v for k, v in model.state_dict().items() if _is_adapted(k, spec)}
    if not own:
        raise ValueError(f"cannot load LoRA weights from {source}: the model has no adapters (apply_lora first)")
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    bad = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    if missing or unexpected or bad:
        lines = [f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in unexpected[:3]] + bad[:3]
        raise ValueError(
            f"LoRA weights in {source} do not fit the model ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(bad)} shape mismatches):\n  " + "\n  ".join(lines)
        )
    result = model.load_state_dict(dict(state_dict), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys


def save_lora(model: SamSegmenter, path: str | Path) -> Path:
    """Write the adapter weights and the spec (a small file) to ``path``."""
    model = _unwrap(model)
    spec = _spec_of(model)
    if spec is None or not has_lora(model):
        raise ValueError("model has no LoRA adapters to save")
    payload: dict[str, Any] = {
        "format": _FILE_FORMAT,
        "version": _FILE_VERSION,
        "spec": asdict(spec),
        "num_classes": model.num_classes,
        "img_size": model.img_size,
        "state_dict": lora_state_dict(model),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def load_lora(model: SamSegmenter, path: str | Path) -> SamSegmenter:
    """Load a :func:`save_lora` file into ``model`` (in place; returns it).

    If ``model`` has no adapters yet they are applied with the file's spec first; if it has
    adapters with a different spec, or the weights do not fit, ``ValueError`` names the file.
    """
    path = Path(path)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _FILE_FORMAT:
        raise ValueError(f"{path} is not a tskd LoRA file")
    file_spec = LoraSpec(**payload["spec"])
    if payload.get("num_classes") != model.num_classes:
        raise ValueError(
            f"LoRA file {path} was trained for {payload.get('num_classes')} classes, "
            f"the model has {model.num_classes}"
        )
    if not has_lora(model):
        apply_lora(model, file_spec)
    elif _spec_of(model) != file_spec:
        raise ValueError(f"LoRA file {path} has spec {file_spec}, the model's adapters have {_spec_of(model)}")
    load_lora_state_dict(model, payload["state_dict"], source=str(path))
    return model


def merge_lora(model: SamSegmenter) -> SamSegmenter:
    """Fold every adapter into its base weight and remove the wrappers (in place; returns ``model``).

    The result has plain ``nn.Linear`` layers and the official state-dict keys; outputs are the same
    as with the adapters (up to float rounding). Parameters stay frozen.
    """
    model = _unwrap(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, QVLoRALinear):
                setattr(module, child_name, child.merge())
            elif isinstance(child, BaseTunerLayer):
                child.merge()
                setattr(module, child_name, child.get_base_layer())
    decoder = model.sam.mask_decoder
    if hasattr(decoder, "peft_config"):
        del decoder.peft_config
    if hasattr(model, "lora_spec"):
        del model.lora_spec
    return model


_ENCODER_QKV = re.compile(
    r"^(sam\.image_encoder\.blocks\.\d+\.attn\.qkv)\.lora_([AB])_([qv])\.weight$")
_PEFT = re.compile(r"^(sam\.mask_decoder\..+)\.lora_([AB])\.default\.weight$")


def plan_merged_lora(base: Mapping[str, ValueFn], adapters: Mapping[str, Tensor], spec: LoraSpec,
                     *, source: str = "<state dict>") -> dict[str, ValueFn]:
    """The load plan of :func:`merge_lora`'s result, key by key, without building the adapters.

    ``base``: the plan of the foundation SAM as a :class:`SamSegmenter` (keys ``sam.…``, e.g.
    :func:`tskd.models.sam.plan_sam_state_dict` with the prefix added); ``adapters``: what the
    adaptation trained (:func:`lora_state_dict`) with ``spec``. Each returned entry gives the merged
    weight: the encoder's fused ``qkv`` (3·dim, in) plus ``[B_q A_q; 0; B_v A_v] · alpha/rank``,
    a decoder ``q_proj``/``v_proj`` plus ``B A · alpha/rank`` (peft's merge), a trained decoder
    weight replaced by its trained value, everything else as in ``base``. Values equal those of
    ``merge_lora(load_lora_state_dict(apply_lora(model, spec), adapters))`` (tested). Raises
    ``ValueError`` naming ``source`` for an adapter or trained weight the base model lacks.
    """
    plan = dict(base)
    deltas: dict[str, dict[str, Tensor]] = {}
    unknown: list[str] = []
    for key, value in adapters.items():
        if m := _ENCODER_QKV.match(key):  # QVLoRALinear: parts Aq, Bq, Av, Bv
            deltas.setdefault(m.group(1) + ".weight", {})[m.group(2) + m.group(3)] = value
        elif m := _PEFT.match(key):  # peft lora.Linear: parts A, B
            deltas.setdefault(m.group(1) + ".weight", {})[m.group(2)] = value
        elif key in base:
            plan[key] = lambda current, v=value: v
        else:
            unknown.append(key)
    for key, parts in deltas.items():
        if key not in base or set(parts) not in ({"A", "B"}, {"Aq", "Bq", "Av", "Bv"}):
            unknown.append(f"{key} (adapter parts {sorted(parts)})")
            continue
        plan[key] = _merged(base[key], parts, spec.scale)
    if unknown:
        raise ValueError(f"LoRA weights in {source} do not fit the teacher ({len(unknown)} keys "
                         "the base model has no place for):\n  " + "\n  ".join(unknown[:5]))
    return plan


def _merged(base: ValueFn, parts: Mapping[str, Tensor], scale: float) -> ValueFn:
    """Base weight plus its adapters' delta, with the float operations of :func:`merge_lora`."""
    def value(current: Tensor) -> Tensor:
        weight = base(current).clone()
        if "A" in parts:  # peft lora.Linear: W += (B @ A) · scaling
            weight += (parts["B"] @ parts["A"]) * scale
            return weight
        d = weight.shape[0] // 3  # QVLoRALinear: rows q | k | v
        delta = torch.zeros_like(weight)
        delta[:d] = parts["Bq"] @ parts["Aq"] * scale
        delta[2 * d:] = parts["Bv"] @ parts["Av"] * scale
        weight += delta
        return weight
    return value


def count_trainable(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad=True``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
