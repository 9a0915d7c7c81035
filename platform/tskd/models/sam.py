"""SAM teacher core: build SAM from ``segment_anything`` classes, load checkpoints, wrap as a segmenter.

Core layer: plain torch + ``segment_anything``. No Ray, no DeepSpeed.

* :data:`SAM_ARCHS` names every architecture: the official ``vit_b``/``vit_l``/``vit_h`` (the
  same hyper-parameters as ``segment_anything.build_sam``) and small presets (``sam_tiny`` for
  tests, ``sam_demo`` for the demo teacher).
* :func:`build_sam` builds any of them at any ``img_size`` (multiple of 16) with
  ``num_multimask_outputs = num_classes`` and optionally loads a checkpoint in the official
  format, resizing position embeddings to the input size and adapting the class-specific decoder
  rows (SAMed style).
* :class:`SamSegmenter` runs SAM without prompts and returns low-res logits for every class plus
  the image embedding (the "hidden" state used for distillation).
"""

from __future__ import annotations

import logging
import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from torch import Tensor, nn

__all__ = [
    "PATCH_SIZE",
    "PROMPT_EMBED_DIM",
    "SAM_ARCHS",
    "SamArchSpec",
    "SamSegmenter",
    "TeacherOutput",
    "build_sam",
    "infer_sam_arch",
    "load_sam_state_dict",
    "plan_sam_state_dict",
    "read_sam_checkpoint",
    "save_sam_checkpoint",
]

logger = logging.getLogger(__name__)

PATCH_SIZE = 16
PROMPT_EMBED_DIM = 256
#: Image size the official SAM weights were trained at.
OFFICIAL_IMG_SIZE = 1024
#: Mask tokens of official SAM = 3 multimask outputs + 1 single-mask token.
OFFICIAL_NUM_MULTIMASK_OUTPUTS = 3
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SamArchSpec:
    """Hyper-parameters of one SAM architecture (``img_size`` and class count are chosen at build)."""

    name: str
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    mlp_ratio: float = 4.0
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16


SAM_ARCHS: dict[str, SamArchSpec] = {
    # Official architectures: identical to segment_anything.build_sam_vit_{b,l,h}.
    "vit_b": SamArchSpec("vit_b", 768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamArchSpec("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamArchSpec("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
    # Small presets built from the same classes.
    "sam_tiny": SamArchSpec(
        "sam_tiny", 64, 2, 2, (1,), window_size=4, decoder_mlp_dim=256
    ),
    "sam_demo": SamArchSpec("sam_demo", 384, 8, 6, (1, 3, 5, 7), window_size=8),
}


class TeacherOutput(NamedTuple):
    """Output of :class:`SamSegmenter`.

    ``logits``: float32 (B, C, img_size/4, img_size/4) low-res mask logits, one per class.
    ``hidden``: float32 (B, 256, img_size/16, img_size/16) image embedding (encoder output).
    """

    logits: Tensor
    hidden: Tensor


def _get_spec(arch: str) -> SamArchSpec:
    try:
        return SAM_ARCHS[arch]
    except KeyError:
        raise ValueError(
            f"unknown SAM arch {arch!r}; allowed: {', '.join(sorted(SAM_ARCHS))}"
        ) from None


def _build_model(spec: SamArchSpec, num_classes: int, img_size: int,
                 module_context: Callable[[], AbstractContextManager] = nullcontext) -> Sam:
    """Build an uninitialised-from-checkpoint ``Sam`` like
    ``segment_anything.build_sam._build_sam``; its three sub-modules are each built inside
    ``module_context()``."""
    grid = img_size // PATCH_SIZE
    with module_context():
        image_encoder = ImageEncoderViT(
            depth=spec.encoder_depth,
            embed_dim=spec.encoder_embed_dim,
            img_size=img_size,
            mlp_ratio=spec.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=spec.encoder_num_heads,
            patch_size=PATCH_SIZE,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=spec.encoder_global_attn_indexes,
            window_size=spec.window_size,
            out_chans=PROMPT_EMBED_DIM,
        )
    with module_context():
        prompt_encoder = PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=spec.mask_in_chans,
        )
    with module_context():
        mask_decoder = MaskDecoder(
            num_multimask_outputs=num_classes,
            transformer=TwoWayTransformer(
                depth=spec.decoder_depth,
                embedding_dim=PROMPT_EMBED_DIM,
                mlp_dim=spec.decoder_mlp_dim,
                num_heads=spec.decoder_num_heads,
            ),
            transformer_dim=PROMPT_EMBED_DIM,
            iou_head_depth=spec.iou_head_depth,
            iou_head_hidden_dim=spec.iou_head_hidden_dim,
        )
    return Sam(image_encoder=image_encoder, prompt_encoder=prompt_encoder,
               mask_decoder=mask_decoder, pixel_mean=list(PIXEL_MEAN), pixel_std=list(PIXEL_STD))


def build_sam(
    arch: str,
    *,
    num_classes: int,
    img_size: int,
    checkpoint: str | Path | None = None,
    module_context: Callable[[], AbstractContextManager] = nullcontext,
) -> Sam:
    """Build a SAM of a named architecture for ``num_classes`` classes at ``img_size`` px.

    The mask decoder has ``num_multimask_outputs = num_classes`` (``C`` counts the background);
    with ``multimask_output=True`` it yields exactly ``C`` masks. The returned model is in eval mode.

    ``checkpoint``: a ``torch.save``-d state dict in the official SAM format (optionally wrapped as
    ``{"model": sd}`` or ``{"state_dict": sd}``); see :func:`load_sam_state_dict` for the resizing
    and class adaptation done on load. ``module_context``: a context each of the three sub-modules
    is built in, e.g. ``deepspeed.zero.Init``, which partitions every parameter as it is made
    (``Sam``'s own ``__init__`` cannot run inside it). Raises ``ValueError`` for an unknown arch,
    a bad ``img_size``/``num_classes`` or a checkpoint of another architecture.
    """
    spec = _get_spec(arch)
    if img_size <= 0 or img_size % PATCH_SIZE:
        raise ValueError(f"img_size must be a positive multiple of {PATCH_SIZE}, got {img_size}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    sam = _build_model(spec, num_classes, img_size, module_context)
    sam.eval()
    if checkpoint is not None:
        path = Path(checkpoint)
        load_sam_state_dict(sam, read_sam_checkpoint(path), arch=arch, source=str(path))
    return sam


def read_sam_checkpoint(path: str | Path, *, mmap: bool = False) -> dict[str, Tensor]:
    """The state dict of a SAM checkpoint file (official format, see :func:`build_sam`).

    ``mmap``: map the file instead of reading it, so each tensor is read from disk when it is
    used and a process never holds the whole checkpoint in its own memory (torch's zip format,
    what ``torch.save`` writes; an older file is read whole, with a log line).
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as e:
        if not mmap or "mmap" not in str(e):
            raise
        logger.info("%s cannot be memory-mapped (%s); reading it whole", path, e)
        state = torch.load(path, map_location="cpu", weights_only=True)
    return _unwrap_state_dict(state, path)


def save_sam_checkpoint(sam: Sam, path: str | Path) -> Path:
    """Write ``sam.state_dict()`` as a plain state dict in the official ``segment_anything`` format.

    Refuses a model that still carries LoRA adapters (merge them first with ``tskd.lora.merge_lora``).
    """
    sd = sam.state_dict()
    foreign = [k for k in sd if ".base_layer." in k or ".base." in k or "lora_" in k]
    if foreign:
        raise ValueError(
            f"cannot save SAM checkpoint {path}: model carries adapter keys (e.g. {foreign[0]}); "
            "merge LoRA first"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu().contiguous() for k, v in sd.items()}, path)
    return path


def _unwrap_state_dict(state: object, path: Path) -> dict[str, Tensor]:
    if isinstance(state, Mapping) and not all(isinstance(v, Tensor) for v in state.values()):
        for key in ("model", "state_dict"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} is not a SAM state dict (a mapping of name -> tensor)")
    sd = dict(state)
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DDP-wrapped model
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def infer_sam_arch(state_dict: Mapping[str, Tensor]) -> str | None:
    """Name of the :data:`SAM_ARCHS` entry a SAM state dict was made for, or a description, or None.

    Uses the encoder width (``patch_embed.proj.weight``), depth (number of blocks) and head dim
    (``rel_pos_h``) — e.g. 768/12 → ``vit_b``, 1024/24 → ``vit_l``, 1280/32 → ``vit_h``.
    """
    w = state_dict.get("image_encoder.patch_embed.proj.weight")
    if not isinstance(w, Tensor) or w.ndim != 4:
        return None
    dim = int(w.shape[0])
    block_ids = {
        int(m.group(1))
        for k in state_dict
        if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k)) is not None
    }
    depth = len(block_ids)
    rel = state_dict.get("image_encoder.blocks.0.attn.rel_pos_h")
    heads = dim // int(rel.shape[1]) if isinstance(rel, Tensor) and rel.ndim == 2 else None
    for name, spec in SAM_ARCHS.items():
        if spec.encoder_embed_dim == dim and spec.encoder_depth == depth and (
            heads is None or spec.encoder_num_heads == heads
        ):
            return name
    return f"unknown (encoder width {dim}, depth {depth}, heads {heads})"


def _resize_pos_embed(pos: Tensor, grid: int) -> Tensor:
    """(1, g, g, D) → (1, grid, grid, D), bicubic."""
    x = pos.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).to(pos.dtype).contiguous()


def _resize_rel_pos(rel: Tensor, length: int) -> Tensor:
    """(L, head_dim) → (length, head_dim), linear along L (as segment_anything's get_rel_pos)."""
    x = rel.float().t().unsqueeze(0)  # (1, head_dim, L)
    x = F.interpolate(x, size=length, mode="linear", align_corners=False)
    return x[0].t().to(rel.dtype).contiguous()


_CLASS_KEY = re.compile(
    r"mask_decoder\.(mask_tokens\.weight|iou_prediction_head\.layers\.\d+\.(weight|bias)"
    r"|output_hypernetworks_mlps\.(\d+)\..*)$"
)


#: A loaded value, computed from the model's own current value (used only where a checkpoint
#: leaves rows at the model's fresh init); see :func:`plan_sam_state_dict`.
ValueFn = Callable[[Tensor], Tensor]


def full_shape(t: Tensor) -> torch.Size:
    """The shape of ``t``, also when it is a partitioned ZeRO-3 parameter (whose ``.data`` is an
    empty placeholder and whose full shape DeepSpeed keeps in ``ds_shape``)."""
    return getattr(t, "ds_shape", t.shape)


def plan_sam_state_dict(
    sam: Sam,
    state_dict: Mapping[str, Tensor],
    *,
    arch: str | None = None,
    source: str = "<state dict>",
) -> tuple[dict[str, ValueFn], list[str]]:
    """How an official-format SAM state dict loads into ``sam``, key by key, without loading it.

    Returns ``(plan, adapted)``: ``plan[key](current) -> value`` for every key of
    ``sam.state_dict()``, where ``current`` is the model's own value of that key (read only for
    rows the checkpoint leaves at the fresh init), and the list of adapted keys. Nothing is read
    from ``state_dict`` until a plan entry is called, so a memory-mapped checkpoint is read one
    tensor at a time; only shapes of ``sam`` are used (its parameters may be partitioned, see
    :func:`full_shape`). The adaptations and errors are those of :func:`load_sam_state_dict`.
    """
    target = {k: full_shape(v) for k, v in sam.state_dict().items()}
    target.update({k: full_shape(p) for k, p in sam.named_parameters()})
    plan: dict[str, ValueFn] = {}
    adapted: list[str] = []
    missing: list[str] = []
    unexpected: list[str] = []
    mismatched: list[str] = []

    pos_embed = sam.image_encoder.pos_embed
    grid = int(full_shape(pos_embed)[1]) if pos_embed is not None else None
    global_blocks = {
        i for i, blk in enumerate(sam.image_encoder.blocks) if getattr(blk, "window_size", 0) == 0
    }
    n_tok_model = sam.mask_decoder.num_mask_tokens
    ckpt_tokens = state_dict.get("mask_decoder.mask_tokens.weight")
    n_tok_ckpt = int(ckpt_tokens.shape[0]) if isinstance(ckpt_tokens, Tensor) else n_tok_model
    n_tok = min(n_tok_model, n_tok_ckpt)
    last_iou = f"iou_prediction_head.layers.{len(sam.mask_decoder.iou_prediction_head.layers) - 1}."

    def as_is(key: str) -> ValueFn:
        return lambda current: state_dict[key]

    def first_rows(key: str) -> ValueFn:
        def value(current: Tensor) -> Tensor:
            new = current.clone()
            new[:n_tok] = state_dict[key][:n_tok]
            return new
        return value

    for key, value in state_dict.items():
        class_key = _CLASS_KEY.match(key)
        if class_key is not None and class_key.group(3) is not None:
            # output_hypernetworks_mlps.<i>.*: one MLP per mask token.
            if int(class_key.group(3)) >= n_tok_model:
                if n_tok_ckpt != n_tok_model:
                    adapted.append(key)
                    continue
        if key not in target:
            unexpected.append(key)
            continue
        want = target[key]
        if value.shape == want:
            plan[key] = as_is(key)
            continue
        m = re.match(r"image_encoder\.blocks\.(\d+)\.attn\.rel_pos_[hw]$", key)
        if key == "image_encoder.pos_embed" and value.ndim == 4 and value.shape[-1] == want[-1] \
                and value.shape[1] == value.shape[2] and grid is not None:
            plan[key] = lambda current, k=key: _resize_pos_embed(state_dict[k], grid)
            adapted.append(f"{key} {tuple(value.shape)}->{tuple(want)}")
        elif m is not None and int(m.group(1)) in global_blocks and value.ndim == 2 \
                and value.shape[1] == want[1]:
            plan[key] = lambda current, k=key, n=want[0]: _resize_rel_pos(state_dict[k], n)
            adapted.append(f"{key} {tuple(value.shape)}->{tuple(want)}")
        elif class_key is not None and n_tok_ckpt != n_tok_model and (
            key == "mask_decoder.mask_tokens.weight" or class_key.group(1).startswith(last_iou)
        ) and value.shape[0] == n_tok_ckpt and value.shape[1:] == want[1:]:
            plan[key] = first_rows(key)
            adapted.append(f"{key} {tuple(value.shape)}->{tuple(want)} (first {n_tok} rows copied)")
        else:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(want)}")

    for key in target:
        if key in plan:
            continue
        class_key = _CLASS_KEY.match(key)
        if class_key is not None and class_key.group(3) is not None and int(class_key.group(3)) >= n_tok_ckpt:
            plan[key] = lambda current: current  # a class the checkpoint does not have: fresh init
            adapted.append(f"{key} (fresh init)")
        elif key not in state_dict:
            missing.append(key)

    if missing or unexpected or mismatched:
        ckpt_arch = infer_sam_arch(state_dict)
        problems = (
            [f"shape mismatch {s}" for s in mismatched[:5]]
            + [f"missing key {k}" for k in missing[:5]]
            + [f"unexpected key {k}" for k in unexpected[:5]]
        )
        raise ValueError(
            f"checkpoint {source} does not fit SAM arch {arch or '<given model>'!r}"
            + (f"; it looks like a {ckpt_arch!r} checkpoint" if ckpt_arch else "")
            + f" ({len(mismatched)} shape mismatches, {len(missing)} missing, "
            f"{len(unexpected)} unexpected keys):\n  " + "\n  ".join(problems)
        )
    return plan, adapted


def load_sam_state_dict(
    sam: Sam,
    state_dict: Mapping[str, Tensor],
    *,
    arch: str | None = None,
    source: str = "<state dict>",
) -> list[str]:
    """Load an official-format SAM state dict into ``sam``, adapting it where this is well defined.

    * Input size: ``image_encoder.pos_embed`` (1, g, g, D) is bicubic-resized to the model's grid;
      the ``rel_pos_h``/``rel_pos_w`` tables (L, head_dim) of global-attention blocks are linearly
      resized to (2·grid − 1, head_dim). Windowed blocks must match as they are.
    * Class count: ``mask_tokens``, the last ``iou_prediction_head`` layer and the
      ``output_hypernetworks_mlps`` have one entry per mask token (C + 1); the first
      ``min(C_ckpt, C_model) + 1`` entries are copied, the rest keep the model's fresh init.
    * Anything else (missing/unexpected keys, other shape mismatches) raises ``ValueError`` naming
      ``source``, the requested ``arch``, the arch the state dict is for (if it can be inferred) and
      the first mismatching keys.

    Returns the list of adapted keys (also logged). :func:`plan_sam_state_dict` is the same
    load, key by key, for models whose parameters are partitioned.
    """
    plan, adapted = plan_sam_state_dict(sam, state_dict, arch=arch, source=source)
    current = sam.state_dict()
    sam.load_state_dict({k: fn(current[k]) for k, fn in plan.items()}, strict=True)
    log_loaded(source, arch, adapted)
    return adapted


def log_loaded(source: str, arch: str | None, adapted: list[str]) -> None:
    """One log line on what a SAM checkpoint load adapted."""
    if adapted:
        logger.info(
            "loaded %s into %s with %d adapted keys: %s",
            source, arch or "SAM", len(adapted), "; ".join(adapted),
        )
    else:
        logger.info("loaded %s into %s (exact match)", source, arch or "SAM")


class SamSegmenter(nn.Module):
    """Prompt-free multi-class SAM (SAMed style).

    ``forward(images)`` takes float32 (B, 3, H, W) RGB in 0..255 and returns
    :class:`TeacherOutput` with ``logits`` (B, C, img_size/4, img_size/4) and ``hidden``
    (B, 256, img_size/16, img_size/16). Images whose size differs from ``img_size`` are resized
    (bilinear) to img_size × img_size first.
    """

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.sam = sam

    @property
    def num_classes(self) -> int:
        """C (including background) = the decoder's ``num_multimask_outputs``."""
        return int(self.sam.mask_decoder.num_multimask_outputs)

    @property
    def img_size(self) -> int:
        """Square input size of the image encoder, in pixels."""
        return int(self.sam.image_encoder.img_size)

    @property
    def hidden_dim(self) -> int:
        """Channels of ``hidden`` (the prompt/transformer dim, 256)."""
        return int(self.sam.mask_decoder.transformer_dim)

    def encode(self, images: Tensor) -> Tensor:
        """float32 (B, 3, H, W) in 0..255 → image embedding (B, 256, img_size/16, img_size/16)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        x = images.float()
        s = self.img_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        x = (x - self.sam.pixel_mean) / self.sam.pixel_std
        return self.sam.image_encoder(x)

    def decode(self, image_embeddings: Tensor) -> Tensor:
        """Image embeddings (B, 256, h, w) → low-res logits (B, C, 4h, 4w), no prompts.

        Equivalent to calling ``sam.mask_decoder(emb[i:i+1], pe, sparse, dense, multimask_output=True)``
        per image, but batched: ``MaskDecoder.predict_masks`` repeats the image embeddings by the
        prompt batch size, so its body is reproduced here with one token set per image.
        """
        pe = self.sam.prompt_encoder
        dec = self.sam.mask_decoder
        b = image_embeddings.shape[0]
        sparse, dense = pe(points=None, boxes=None, masks=None)  # (1, 0, 256), (1, 256, h, w)
        image_pe = pe.get_dense_pe()  # (1, 256, h, w)

        output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat(
            [output_tokens.unsqueeze(0).expand(b, -1, -1), sparse.expand(b, -1, -1)], dim=1
        )
        src = image_embeddings + dense
        pos_src = image_pe.expand(b, -1, -1, -1)
        _, c, h, w = src.shape

        hs, src = dec.transformer(src, pos_src, tokens)
        mask_tokens_out = hs[:, 1 : 1 + dec.num_mask_tokens, :]
        src = src.transpose(1, 2).reshape(b, c, h, w)
        upscaled = dec.output_upscaling(src)
        hyper_in = torch.stack(
            [dec.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in range(dec.num_mask_tokens)],
            dim=1,
        )
        _, c2, h2, w2 = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c2, h2 * w2)).reshape(b, -1, h2, w2)
        # multimask_output=True: drop the single-mask token → exactly C masks.
        return masks[:, 1:]

    def forward(self, images: Tensor) -> TeacherOutput:
        """float32 (B, 3, H, W) in 0..255 → TeacherOutput(logits (B,C,s/4,s/4), hidden (B,256,s/16,s/16))."""
        hidden = self.encode(images)
        return TeacherOutput(logits=self.decode(hidden), hidden=hidden)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """Logits upsampled (bilinear) to the input size: (B, 3, H, W) → (B, C, H, W). No grad."""
        logits = self.forward(images).logits
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
