"""Typed experiment configuration: the one place where defaults live.

An experiment is an :class:`ExperimentConfig`, a tree of dataclasses. YAML files hold values only;
they are merged onto the defaults, then ``--set a.b=c`` overrides are applied, and the result is
validated on the driver before Ray starts. Every error is a :class:`ConfigError` naming the dotted
field, the bad value and what is allowed::

    >>> cfg = load_config(None, ["distill.w_logits=0.5"])
    >>> cfg.distill.w_logits
    0.5

This module imports nothing heavy (no torch, no Ray): the CLI validates before anything else loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from tskd.storage import REMOTE_SCHEMES

SAM_ARCHS = ("vit_b", "vit_l", "vit_h", "sam_demo", "sam_tiny")
"""Teacher architectures; must equal the keys of ``tskd.models.sam.SAM_ARCHS`` (tested)."""
OFFICIAL_SAM_ARCHS = ("vit_b", "vit_l", "vit_h")
STUDENT_ARMS = ("ts_kd", "ta_kd", "scratch", "imagenet_mae", "mae", "mocov3")
"""Students the pipeline can train: task-specific KD, task-agnostic KD, random init, and the
paper's other baselines: ImageNet-MAE weights, MAE or MoCo v3 pre-training on the transfer set."""
DEFAULT_ARMS = ("ts_kd", "ta_kd", "scratch")
"""``students`` by default."""
VIT_ONLY_ARMS = ("imagenet_mae", "mae", "mocov3")
"""Arms defined for the ViT student only (``student.arch: vit``)."""
STUDENT_ARCHS = ("vit", "timm_unet", "basic_unet", "segresnet")
"""Student architectures; must equal ``tskd.models.students.STUDENT_ARCHS`` (tested)."""
TIMM_ENCODERS = ("resnet18", "resnet34", "efficientnet_b0", "efficientnet_b1", "repvit_m0_9",
                 "repvit_m1_1", "mobilevit_xxs", "mobilevit_xs", "convnext_atto")
"""Encoders of ``timm_unet``; must equal ``tskd.models.students.TIMM_ENCODERS`` (tested)."""


class TskdError(ValueError):
    """Bad input the user can fix (config, dataset, checkpoint). The CLI reports it as one line
    and exit status 2, also when a Ray worker raised it (see ``tskd.stages.errors``)."""


class ConfigError(TskdError):
    """A configuration value is unknown or invalid; the message names the dotted field."""


class QualityCheckFailed(TskdError):
    """A model scored at or below its quality floor and ``check.on_fail`` is ``stop``
    (``tskd.quality``); the message names the numbers and the likely causes."""


def _check(cond: bool, path: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{path}: invalid value {value!r}; allowed: {allowed}")


_LOOP_RULES: dict[str, tuple[Any, str]] = {
    "epochs": (lambda v: v >= 1, "an integer >= 1"),
    "steps": (lambda v: v >= 1, "an integer >= 1"),
    "train_steps": (lambda v: v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "lr": (lambda v: v > 0, "a number > 0"),
    "warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "warmup_iters": (lambda v: v >= 0, "an integer >= 0"),
    "warmup_epochs": (lambda v: v >= 0, "a number >= 0"),
}


def _check_loop(section: Any, path: str, *names: str) -> None:
    """The usual range checks of a training loop's fields (epochs, batch_size, lr, warm-up)."""
    for name in names:
        rule, allowed = _LOOP_RULES[name]
        value = getattr(section, name)
        _check(rule(value), f"{path}.{name}", value, allowed)


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


DEEPSPEED_KEYS = (
    "zero_optimization", "gradient_clipping", "gradient_accumulation_steps",
    "train_micro_batch_size_per_gpu", "train_batch_size", "bf16", "fp16", "torch_autocast",
    "optimizer", "scheduler", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "steps_per_print", "wall_clock_breakdown", "dump_state", "prescale_gradients",
    "gradient_predivide_factor", "communication_data_type", "seq_parallel_communication_data_type",
    "sparse_gradients", "memory_breakdown", "activation_checkpointing", "flops_profiler",
    "comms_logger", "tensorboard", "wandb", "csv_monitor", "checkpoint",
    "data_types", "aio", "compile", "timers", "graph_harvesting", "use_data_before_expert_parallelism",
    "zero_quantized_weights", "zero_quantized_nontrainable_weights", "elasticity",
    "autotuning", "data_efficiency", "curriculum_learning", "compression_training",
    "nebula", "weight_quantization", "pipeline", "amp",
    "disable_allgather", "dataloader_drop_last", "eigenvalue", "progressive_layer_drop",
    "quantize_training", "sparse_attention", "hybrid_engine", "tensor_parallel",
)
"""Top-level DeepSpeed config keys ``engine.raw`` may hold (checked on the driver; a test checks
each is a key DeepSpeed reads)."""

_ENGINE_OWNED = {
    "gradient_accumulation_steps": "gradient_accumulation",
    "gradient_clipping": "clip_grad_norm",
    "train_micro_batch_size_per_gpu": "the stage's batch_size",
    "train_batch_size": "the stage's batch_size",
    "bf16": "precision", "fp16": "precision", "torch_autocast": "precision",
    "optimizer": "optimizer",
    "scheduler": "the stage's learning-rate schedule (lr, warm-up)",
}
"""``engine.raw`` keys a typed field derives: naming one in ``raw`` is an error (use the field)."""
_ZERO_OWNED = {"stage": "zero_stage", "offload_optimizer": "offload_optimizer",
               "offload_param": "offload_params"}


DISTILL_ZERO_STAGE = 2


@dataclass
class EngineConfig:
    """How a training stage runs its step (:mod:`tskd.stages.engine`): plain PyTorch with DDP
    (``torch``), or a DeepSpeed engine (``deepspeed``) whose config is derived from these fields
    (plus ``raw``) and checked here, on the driver."""

    kind: Literal["auto", "torch", "deepspeed"] = "torch"
    """``auto``: ``deepspeed`` when the workers have GPUs (``ray.use_gpu``), ``torch`` on CPU,
    where DeepSpeed brings nothing but its import and start-up (with its ZeRO buckets sized to
    the model it steps as fast as DDP there, with the same losses; benchmarks/README.md).
    ``zero_stage`` then applies on GPUs only."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (``deepspeed`` only): 1 partitions the optimiser state, 2 also
    the gradients, 3 also the parameters (checkpoints are then consolidated collectively)."""
    gradient_accumulation: int = 1
    """Micro-batches per optimiser step (the loss is divided by it)."""
    clip_grad_norm: float = 0.0
    """Clip the global gradient norm to this before each step; 0 = no clipping."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """``fp32`` (the only choice on CPU), or autocast to ``bf16``/``fp16`` on GPU with fp32
    master weights (torch: ``torch.autocast`` (+ GradScaler for fp16); deepspeed: its
    ``torch_autocast`` section)."""
    optimizer: Literal["adamw", "cpu_adam", "fused_adam"] = "adamw"
    """``adamw`` = ``torch.optim.AdamW``; ``cpu_adam`` = DeepSpeed's ``DeepSpeedCPUAdam`` (AdamW
    mode; JIT-built once, ~1 min; needed by ``offload_optimizer``); ``fused_adam`` = torch's
    fused CUDA AdamW (GPU only)."""
    offload_optimizer: bool = False
    """ZeRO-Offload: optimiser state and step on the CPU (deepspeed, zero_stage >= 1)."""
    offload_params: bool = False
    """ZeRO-Infinity parameter offload to the CPU (deepspeed, zero_stage 3)."""
    raw: dict[str, Any] = field(default_factory=dict)
    """Escape hatch: DeepSpeed config keys merged over the derived config (top-level keys from
    ``DEEPSPEED_KEYS``; keys the fields above derive are refused)."""

    def resolved_kind(self, use_gpu: bool) -> str:
        """``torch`` or ``deepspeed``: ``kind`` with ``auto`` resolved for GPU or CPU workers."""
        if self.kind == "auto":
            return "deepspeed" if use_gpu else "torch"
        return self.kind

    def validate(self, path: str, use_gpu: bool | None = None) -> None:
        ds = self.resolved_kind(bool(use_gpu)) == "deepspeed"
        _check(0 <= self.zero_stage <= 3, f"{path}.zero_stage", self.zero_stage,
               "an integer in [0, 3]")
        _check(ds or self.kind == "auto" or self.zero_stage == 0, f"{path}.zero_stage",
               self.zero_stage, "0 with kind 'torch' (ZeRO needs kind 'deepspeed')")
        if self.kind == "auto" and not ds:  # DeepSpeed-only settings would be ignored silently
            for name in ("offload_optimizer", "offload_params", "raw"):
                _check(not getattr(self, name), f"{path}.{name}", getattr(self, name),
                       "unset while kind is 'auto' on CPU workers (auto runs torch there; set "
                       f"{path}.kind: deepspeed to use DeepSpeed on CPU)")
            _check(self.optimizer != "cpu_adam", f"{path}.optimizer", self.optimizer,
                   f"'adamw' while kind is 'auto' on CPU workers (or set {path}.kind: deepspeed)")
        _check(self.gradient_accumulation >= 1, f"{path}.gradient_accumulation",
               self.gradient_accumulation, "an integer >= 1")
        _check(self.clip_grad_norm >= 0, f"{path}.clip_grad_norm", self.clip_grad_norm,
               "a number >= 0 (0 = no clipping)")
        _check(not (ds and self.precision == "fp16" and self.zero_stage > 0),
               f"{path}.precision", self.precision,
               "'fp32' or 'bf16' with zero_stage > 0 (DeepSpeed's autocast scales fp16 losses "
               "only without ZeRO)")
        _check(ds or self.optimizer != "cpu_adam", f"{path}.optimizer", self.optimizer,
               "'adamw' or 'fused_adam' with kind 'torch' (cpu_adam is DeepSpeed's)")
        _check(not self.offload_optimizer or (ds and self.zero_stage >= 1),
               f"{path}.offload_optimizer", self.offload_optimizer,
               "false unless kind is 'deepspeed' and zero_stage >= 1")
        _check(not self.offload_optimizer or self.optimizer == "cpu_adam",
               f"{path}.optimizer", self.optimizer,
               "'cpu_adam' with offload_optimizer (the step runs on the CPU)")
        _check(not self.offload_params or (ds and self.zero_stage == 3),
               f"{path}.offload_params", self.offload_params,
               "false unless kind is 'deepspeed' and zero_stage is 3")
        _check(ds or not self.raw, f"{path}.raw", self.raw, "{} with kind 'torch'")
        for key, value in self.raw.items():
            _check(key in DEEPSPEED_KEYS, f"{path}.raw.{key}", value,
                   f"a DeepSpeed config key, one of {sorted(DEEPSPEED_KEYS)}")
            if key in _ENGINE_OWNED:
                raise ConfigError(f"{path}.raw.{key}: set by {_ENGINE_OWNED[key]} (use "
                                  f"{path}.{_ENGINE_OWNED[key]}, not raw)")
            if key == "zero_optimization":
                _check(isinstance(value, dict), f"{path}.raw.{key}", value, "a mapping")
                for sub in value:
                    if sub in _ZERO_OWNED:
                        raise ConfigError(f"{path}.raw.zero_optimization.{sub}: set by "
                                          f"{path}.{_ZERO_OWNED[sub]} (use it, not raw)")
        if use_gpu is not None and not use_gpu:
            _check(self.precision == "fp32", f"{path}.precision", self.precision,
                   "'fp32' while ray.use_gpu is false (bf16/fp16 autocast is for GPUs)")
            _check(self.optimizer != "fused_adam", f"{path}.optimizer", self.optimizer,
                   "'adamw' or 'cpu_adam' while ray.use_gpu is false (fused Adam is CUDA-only)")


@dataclass
class DemoDataConfig:
    """The built-in procedural datasets (used when ``data.root`` is null)."""

    kind: Literal["ultrasound", "vessels"] = "ultrasound"
    """``ultrasound``: organ + lesion (``tskd.data.demo``); ``vessels``: fundus-like images with
    branching vessels 1-4 px wide (``tskd.data.demo_vessels``), a thin-structure task."""
    n_images: int = 360
    size: int = 128
    seed: int = 0

    def validate(self, path: str) -> None:
        _check(self.n_images >= 20, f"{path}.n_images", self.n_images, "an integer >= 20")
        _check(32 <= self.size <= 1024, f"{path}.size", self.size, "an integer in [32, 1024]")


@dataclass
class DataConfig:
    """Dataset, splits and label budget."""

    root: str | None = None
    """Dataset directory in the tskd format (``dataset.json``, ``images/``, ``masks/``);
    null runs the built-in demo dataset, written under ``runs/<experiment>/data``."""
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)
    image_size: int | Literal["auto"] = "auto"
    """Working resolution of labelled images; each model resizes to its own input size.
    ``auto``: the plan of the dataset's fingerprint (``tskd.data.fingerprint``, made from the
    label budget's masks when the run starts: the smallest size, a multiple of 16, that keeps
    every class's structures >= 2 px wide, at most ``max_image_size``); the built-in demos take
    ``demo.size``. An explicit size wins, with a warning naming each class it makes too thin."""
    max_image_size: int = 512
    """The largest whole image the models train on: a dataset whose plan needs a larger working
    size keeps that size (``image_size: auto``) and is trained on patches of this size
    (``patch_size: auto``)."""
    patch_size: int | Literal["auto"] = "auto"
    """Side of the training crops and of the inference window (``tskd.data.patches``,
    ``tskd.evaluation.sliding_window_logits``). ``auto``: ``min(image_size, max_image_size)``,
    so whole images up to ``max_image_size`` and patches of that size beyond it. An integer:
    crops of that side (at most ``image_size``; ``>= image_size`` = whole images). Models see
    each crop at their own input size (``teacher.img_size``, ``student.img_size``)."""
    fg_fraction: float = 1 / 3
    """Share of training crops centred on a foreground pixel (nnU-Net: a third); the others are
    drawn anywhere. Unused with whole images."""
    n_labels: int = 40
    """Label budget: the number of labelled images the method may use IN TOTAL (training and
    validation together), a seeded subset of the train split; a larger budget is a superset."""
    model_selection: bool = True
    """Validate every epoch on ``val_share`` of the budget and keep the best epoch. False (or
    ``val_share`` 0): no validation images, train the fixed schedule and keep the last epoch
    (as the TS-KD paper does)."""
    val_share: float = 0.2
    """Share of ``n_labels`` held out (from inside the budget) for model selection:
    ``round(val_share · n_labels)`` images, at least 1, whole groups (see dataset.json
    ``groups``)."""
    test_fraction: float = 0.2
    """Test share when dataset.json declares no splits."""
    augment: bool = True

    @property
    def n_val(self) -> int:
        """Validation images carved from the budget (0 when model selection is off)."""
        if not self.model_selection or self.val_share == 0:
            return 0
        return min(self.n_labels - 1, max(1, round(self.val_share * self.n_labels)))

    @property
    def patch(self) -> int:
        """The crop / window side for a resolved ``image_size``: ``patch_size`` (``auto``:
        ``max_image_size``), at most ``image_size``; ``== image_size``: whole images."""
        if self.image_size == "auto":
            raise ValueError("data.image_size is not resolved yet "
                             "(tskd.data.fingerprint.resolve_image_size)")
        p = self.max_image_size if self.patch_size == "auto" else int(self.patch_size)
        return min(p, int(self.image_size))

    @property
    def patches(self) -> bool:
        """Training on crops smaller than the (resolved) images."""
        return self.patch < int(self.image_size)  # type: ignore[arg-type]

    def stage_slice(self) -> dict[str, Any]:
        """This section as stage fingerprints see it: ``patch_size`` and ``fg_fraction`` only
        when patches are on, so whole-image runs keep the fingerprints they had before patch
        training existed."""
        out = dataclasses.asdict(self)
        if self.image_size == "auto" or not self.patches:
            out.pop("patch_size")
            out.pop("fg_fraction")
        else:
            out["patch_size"] = self.patch
        return out

    def validate(self, path: str) -> None:
        self.demo.validate(f"{path}.demo")
        _check(self.image_size == "auto" or 16 <= self.image_size <= 2048,
               f"{path}.image_size", self.image_size, "'auto' or an integer in [16, 2048]")
        _check(self.max_image_size % 16 == 0 and 64 <= self.max_image_size <= 2048,
               f"{path}.max_image_size", self.max_image_size,
               "a multiple of 16 in [64, 2048]")
        _check(self.patch_size == "auto" or 16 <= self.patch_size <= 2048,
               f"{path}.patch_size", self.patch_size, "'auto' or an integer in [16, 2048]")
        _check(0.0 <= self.fg_fraction <= 1.0, f"{path}.fg_fraction", self.fg_fraction,
               "a number in [0, 1]")
        _check(self.n_labels >= 1, f"{path}.n_labels", self.n_labels, "an integer >= 1")
        _check(0.0 <= self.val_share < 1.0, f"{path}.val_share", self.val_share,
               "a number in [0, 1) (0 turns model selection off)")
        _check(not (self.n_val == 0 and self.model_selection and self.val_share > 0),
               f"{path}.n_labels", self.n_labels,
               "an integer >= 2 when model selection is on (validation images come from "
               "inside the budget); or set data.model_selection=false")
        _check(0.0 < self.test_fraction < 1.0, f"{path}.test_fraction", self.test_fraction,
               "a number in (0, 1)")


@dataclass
class PretrainConfig:
    """Pre-training of a small SAM on the broad procedural corpus (demo teachers only)."""

    steps: int = 360
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 40
    seed: int = 0
    """Seed of the pre-training run. The foundation model is one fixed asset for every experiment
    seed (as an official checkpoint is), so it is trained and cached once, not once per seed."""
    cache_dir: str = "~/.cache/tskd"
    """Pre-trained teachers are cached here, keyed by a fingerprint of this section."""
    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self, path: str) -> None:
        _check_loop(self, path, "steps", "batch_size", "lr", "warmup_steps")


@dataclass
class LoraConfig:
    """LoRA on the q and v projections of the encoder blocks (and of the mask decoder when
    ``teacher.decoder`` is ``lora``)."""

    rank: int = 4
    alpha: float | None = None
    """Scaling numerator (delta = alpha/rank · BA); null means alpha = rank."""
    dropout: float = 0.0

    def validate(self, path: str) -> None:
        _check(self.rank >= 1, f"{path}.rank", self.rank, "an integer >= 1")
        _check(self.alpha is None or self.alpha > 0, f"{path}.alpha", self.alpha,
               "null or a number > 0")
        _check(0.0 <= self.dropout < 1.0, f"{path}.dropout", self.dropout, "a number in [0, 1)")


@dataclass
class TeacherFinetuneConfig:
    """LoRA fine-tuning of the teacher on the labelled subset (0.2·CE + 0.8·Dice, as SAMed)."""

    epochs: int = 20
    batch_size: int = 8
    lr: float = 0.005
    weight_decay: float = 0.1
    warmup_iters: int = 250
    """Linear warm-up iterations, then linear decay to zero."""
    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self, path: str) -> None:
        _check_loop(self, path, "epochs", "batch_size", "lr", "warmup_iters")


@dataclass
class TeacherConfig:
    """The SAM teacher: architecture, foundation weights, LoRA and its fine-tuning."""

    arch: str = "sam_demo"
    checkpoint: str | None = None
    """Official SAM ``.pth`` (``sam_vit_b_01ec64.pth`` ...). Null: pre-train a small SAM on the
    procedural corpus first (demo architectures only)."""
    img_size: int = 128
    decoder: Literal["full", "lora", "frozen"] = "full"
    """How the mask decoder is adapted (the image encoder always gets LoRA on q/v): ``full``
    trains the decoder as SAMed's code does; ``lora`` puts LoRA on its q/v projections and trains
    the mask tokens and hypernetwork MLPs (one per class); ``frozen`` keeps it as pre-trained."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    finetune: TeacherFinetuneConfig = field(default_factory=TeacherFinetuneConfig)

    def validate(self, path: str) -> None:
        _check(self.arch in SAM_ARCHS, f"{path}.arch", self.arch, f"one of {list(SAM_ARCHS)}")
        if self.arch in OFFICIAL_SAM_ARCHS and self.checkpoint is None:
            raise ConfigError(
                f"{path}.checkpoint: invalid value None for arch {self.arch!r}; allowed: the path "
                f"of an official SAM checkpoint (e.g. sam_{self.arch}_*.pth). Only the demo "
                f"architectures {[a for a in SAM_ARCHS if a not in OFFICIAL_SAM_ARCHS]} can be "
                "pre-trained from scratch by tskd")
        _check(self.img_size % 16 == 0 and self.img_size >= 32, f"{path}.img_size",
               self.img_size, "a multiple of 16, >= 32")
        self.pretrain.validate(f"{path}.pretrain")
        self.lora.validate(f"{path}.lora")
        self.finetune.validate(f"{path}.finetune")


@dataclass
class DiffusionConfig:
    """The diffusers UNet2DModel + DDPMScheduler trained on augmented labelled images."""

    image_size: int = 32
    """Resolution the diffusion model works at; samples are resized to ``data.image_size``.
    The demo's 32 px keeps DDPM training within a CPU budget (~0.2 s/step on 2 cores)."""
    n_augmented: int = 1000
    """Augmented copies of the labelled images to train on (the paper uses 1,000)."""
    augment_strength: Literal["none", "light", "default", "strong"] = "light"
    """Augmentation preset (``tskd.data.augment.STRENGTHS``) for those copies; light keeps the
    acquisition geometry (e.g. an ultrasound fan) consistent, which a small DDPM learns faster."""
    train_steps: int = 800
    batch_size: int = 8
    lr: float = 1e-3
    num_train_timesteps: int = 1000
    num_inference_steps: int = 20
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    """Sampling scheduler built from the training schedule's betas: ``ddpm`` (ancestral) or
    ``ddim`` (eta = 0) on ``num_inference_steps`` strided timesteps. With CPU-budget (under-
    trained) models DDPM at 25 steps matches DDPM at 250 and keeps the data's structure and
    contrast, while DDIM samples stay noise-like even at 100 steps (measured; see
    ``tskd.diffusion.sample_images``)."""
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(clip_grad_norm=1.0))
    """The DDPM's training step (clipping at 1, as diffusers' examples)."""
    ema_decay: float = 0.0
    """> 0 keeps an EMA of the UNet weights (diffusers ``EMAModel`` with warm-up, capped at this
    decay) and samples from it; 0 disables."""

    def validate(self, path: str) -> None:
        _check(self.image_size % 8 == 0 and self.image_size >= 16, f"{path}.image_size",
               self.image_size, "a multiple of 8, >= 16")
        _check(self.layers_per_block >= 1, f"{path}.layers_per_block", self.layers_per_block,
               "an integer >= 1")
        _check(0.0 <= self.ema_decay < 1.0, f"{path}.ema_decay", self.ema_decay,
               "a number in [0, 1) (0 disables the EMA)")
        _check(self.n_augmented >= 1, f"{path}.n_augmented", self.n_augmented, "an integer >= 1")
        _check_loop(self, path, "train_steps", "batch_size", "lr")
        _check(1 <= self.num_inference_steps <= self.num_train_timesteps,
               f"{path}.num_inference_steps", self.num_inference_steps,
               f"an integer in [1, num_train_timesteps={self.num_train_timesteps}]")
        _check(len(self.block_out_channels) >= 1 and all(c > 0 and c % 8 == 0
                                                         for c in self.block_out_channels),
               f"{path}.block_out_channels", self.block_out_channels,
               "a non-empty list of positive multiples of 8")
        factor = 2 ** (len(self.block_out_channels) - 1)
        _check(self.image_size % factor == 0, f"{path}.image_size", self.image_size,
               f"a multiple of 2**(len(block_out_channels)-1) = {factor} (one downsampling per "
               "extra UNet level)")


@dataclass
class TransferConfig:
    """The transfer set: synthetic images (sampling with Ray Data, quality and near-copy guard)
    and/or the train split's real unlabelled images."""

    sources: list[Literal["synthetic", "unlabelled"]] = field(
        default_factory=lambda: ["synthetic"])
    """What the transfer set holds: ``synthetic`` (DDPM samples, the paper's setting),
    ``unlabelled`` (the train split's real images outside the label budget; their labels are
    never used), or both. Without ``synthetic`` no diffusion model is trained."""
    n_unlabelled: int | None = None
    """How many real unlabelled images join (a seeded subset); null = all of them."""
    n_images: int = 300
    """Synthetic images to sample (when ``sources`` has ``synthetic``)."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    num_actors: int = 1
    """Sampler actors (one model load each)."""
    actor_cpus: float = 1.0
    sample_batch_size: int = 16
    grayscale: Literal["auto", "always", "never"] = "auto"
    """Average the sampled images' channels (R = G = B). ``auto``: when every labelled training
    image is grayscale (e.g. ultrasound); an RGB DDPM otherwise adds colour casts."""
    near_copy_psnr: float = 30.0
    """A synthetic image whose PSNR (dB) against its nearest training image is at or above this
    is a near-copy of a training image (privacy risk)."""
    drop_near_copies: bool = True

    def validate(self, path: str) -> None:
        _check(len(self.sources) >= 1 and len(set(self.sources)) == len(self.sources),
               f"{path}.sources", self.sources,
               "a non-empty list of distinct names from ['synthetic', 'unlabelled']")
        _check(self.n_unlabelled is None or self.n_unlabelled >= 1, f"{path}.n_unlabelled",
               self.n_unlabelled, "null (all) or an integer >= 1")
        _check(self.n_images >= 1, f"{path}.n_images", self.n_images, "an integer >= 1")
        self.diffusion.validate(f"{path}.diffusion")
        _check(self.num_actors >= 1, f"{path}.num_actors", self.num_actors, "an integer >= 1")
        _check(self.actor_cpus > 0, f"{path}.actor_cpus", self.actor_cpus, "a number > 0")
        _check(self.sample_batch_size >= 1, f"{path}.sample_batch_size", self.sample_batch_size,
               "an integer >= 1")


@dataclass
class StudentConfig:
    """The student, random init (``tskd.models.students`` lists the architectures)."""

    arch: str = "vit"
    """One of STUDENT_ARCHS: ``vit`` (timm ViT + FPN head, the paper's), ``timm_unet`` (timm
    encoder ``encoder`` + U-Net decoder), ``basic_unet`` / ``segresnet`` (MONAI)."""
    encoder: str = "resnet18"
    """timm encoder of ``timm_unet`` (one of TIMM_ENCODERS); unused by the other archs."""
    model_name: str = "vit_tiny_patch16_224"
    """``vit`` only: the timm ViT."""
    img_size: int = 128
    """Working size: inputs are resized to it, logits resized back."""
    patch_size: int = 16
    """``vit`` only."""
    decoder_dim: int = 128
    """``vit`` only: channels of the FPN head."""
    head_stride: int = 4
    """``vit`` only: stride of the FPN head's finest level, where it makes the logits (ViTDet's
    4; 8 or 16 make a lighter, faster head whose logits are upsampled further)."""

    @property
    def input_multiple(self) -> int:
        """``img_size`` must be a multiple of this (the largest stride of the arch)."""
        return {"vit": self.patch_size, "timm_unet": 32}.get(self.arch, 16)

    def validate(self, path: str) -> None:
        _check(self.arch in STUDENT_ARCHS, f"{path}.arch", self.arch,
               f"one of {list(STUDENT_ARCHS)}")
        if self.arch == "timm_unet":
            _check(self.encoder in TIMM_ENCODERS, f"{path}.encoder", self.encoder,
                   f"one of {list(TIMM_ENCODERS)} (arch 'timm_unet')")
        if self.arch != "vit":
            m = self.input_multiple
            _check(self.img_size % m == 0 and self.img_size >= 32, f"{path}.img_size",
                   self.img_size, f"a multiple of {m} for arch {self.arch!r}, >= 32")
            return
        _check(self.model_name.startswith("vit_"), f"{path}.model_name", self.model_name,
               "a timm ViT name such as 'vit_tiny_patch16_224' (arch 'vit')")
        _check(self.patch_size in (8, 16), f"{path}.patch_size", self.patch_size, "8 or 16")
        _check(self.img_size % self.patch_size == 0 and self.img_size >= 4 * self.patch_size,
               f"{path}.img_size", self.img_size,
               f"a multiple of patch_size={self.patch_size}, >= {4 * self.patch_size}")
        allowed = [s for s in (4, 8, 16) if s <= self.patch_size]
        _check(self.head_stride in allowed, f"{path}.head_stride", self.head_stride,
               f"one of {allowed} (<= patch_size={self.patch_size})")


STUDENT_PRESETS: dict[str, dict[str, Any]] = {
    # Named students (the grid's ``students`` axis, benchmarks/students.py): student fields.
    "vit16": {"arch": "vit", "patch_size": 16},
    "vit8": {"arch": "vit", "patch_size": 8},
    "resnet18": {"arch": "timm_unet", "encoder": "resnet18"},
    "efficientnet_b0": {"arch": "timm_unet", "encoder": "efficientnet_b0"},
    "repvit_m0_9": {"arch": "timm_unet", "encoder": "repvit_m0_9"},
    "mobilevit_xxs": {"arch": "timm_unet", "encoder": "mobilevit_xxs"},
    "basic_unet": {"arch": "basic_unet"},
    "segresnet": {"arch": "segresnet"},
}
"""Student name -> the ``student`` fields it sets."""

KD_PRESETS: dict[str, dict[str, Any]] = {
    # The eight KD loss configurations of the paper's Table 8 (weights from its prose; see
    # ../shared/notes/paper-facts.md). TS-KD8 equals the defaults of DistillConfig.
    "ts_kd1": {"logits_loss": "mse", "logits_target": "squeezed", "w_logits": 0.2, "w_hidden": 1.0},
    "ts_kd2": {"logits_loss": "mse", "logits_target": "interpolated", "w_logits": 0.1,
               "w_hidden": 1.0},
    "ts_kd3": {"logits_loss": "mse", "logits_target": "teacher", "w_logits": 0.001, "w_hidden": 1.0},
    "ts_kd4": {"logits_loss": "ce", "logits_target": "interpolated", "w_logits": 1.0, "w_hidden": 1.0},
    "ts_kd5": {"logits_loss": "ce", "logits_target": "interpolated", "w_logits": 1.0, "w_hidden": 0.1},
    "ts_kd6": {"logits_loss": "mse", "logits_target": "interpolated", "w_logits": 0.1,
               "w_hidden": 0.0},
    "ts_kd7": {"logits_loss": "mse", "logits_target": "interpolated", "w_logits": 0.1,
               "w_hidden": 0.1},
    "ts_kd8": {"logits_loss": "mse", "logits_target": "interpolated", "w_logits": 0.2,
               "w_hidden": 0.1},
}
"""``distill.preset`` name -> the distill fields it sets (Table 8's TS-KD1..8)."""


@dataclass
class DistillConfig:
    """Distillation on the transfer set (TS-KD; task-agnostic KD keeps only the hidden term).

    The loss is ``w_logits · L(student logits, teacher logits) + w_hidden · MSE(P(student
    hidden), teacher hidden)`` (:class:`tskd.losses.KDLoss`)."""

    preset: str | None = None
    """One of Table 8's configurations ``ts_kd1`` … ``ts_kd8`` (``KD_PRESETS``): it sets
    ``logits_loss``, ``logits_target``, ``w_logits`` and ``w_hidden`` when the config is loaded
    (over their defaults); giving one of those fields a value other than its default and the
    preset's is an error. Null: the fields as given (the defaults are TS-KD8)."""
    w_logits: float = 0.2
    w_hidden: float = 0.1
    logits_loss: Literal["mse", "ce"] = "mse"
    """``mse`` on logits, or ``ce``: soft-target cross-entropy on class probabilities."""
    logits_target: Literal["interpolated", "teacher", "squeezed"] = "interpolated"
    """How the teacher's low-res logits meet the student's: ``interpolated`` (teacher upsampled
    to the student's size), ``teacher`` (un-interpolated: the student pooled to the teacher's
    size), ``squeezed`` (tskd's reading of TS-KD1's "removing the last dimension of masks"; see
    ``tskd.losses.LOGITS_TARGETS``)."""
    teacher_features: Literal["neck", "blocks"] = "neck"
    """The teacher's "hidden states": ``neck`` = the image embedding after SAM's neck (256-d),
    ``blocks`` = the last encoder block's tokens before the neck (the encoder's width). The
    student side is set by ``student_block``."""
    student_block: int = -1
    """The student layer the hidden term compares: for the ``vit`` student, the block whose
    output tokens (through the final norm) are its hidden state, 0-based, negative counting from
    the end; -1 = the last block (the final encoder hidden state, the paper's). Other students
    have one stride-16 feature map and accept only -1."""
    normalize: bool = False
    """Divide each MSE term by a running estimate of its target's variance, so the weights mean
    the same across teachers and datasets (the raw logit term can be 20–40× the hidden term)."""
    epochs: int = 3
    batch_size: int = 8
    lr: float = 1.5e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    """Linear warm-up (in epochs, may be fractional), then cosine decay."""
    teacher_placement: Literal["auto", "replicated", "sharded", "cached"] = "auto"
    """Where the frozen teacher lives during distillation: ``replicated`` = every worker holds it
    and runs it on every batch of every epoch; ``sharded`` = the workers hold it partitioned with
    ZeRO-3 (each ``1/num_workers`` of it) and gather it layer by layer in its forward, on every
    batch (``tskd.stages.engine.ShardedModule``; it is built partitioned, so no worker ever
    holds the whole teacher, also not while loading it); ``cached`` = a ``targets_<arm>`` stage
    runs it once per transfer image (2 views) and distillation streams the stored fp16 targets
    (``tskd.stages.teacher_cache``); ``auto`` = ``cached`` when that cache fits
    ``cache_max_gb``, else ``replicated``."""
    shard_persist_below: int = 100_000
    """``sharded``: teacher parameters with fewer elements stay whole on every worker (DeepSpeed's
    ``stage3_param_persistence_threshold``; biases and norms: gathering them costs more than
    they weigh). 0 partitions every parameter."""
    shard_prefetch: int = 0
    """``sharded``: teacher parameter elements gathered ahead of the running layer (DeepSpeed's
    ``stage3_prefetch_bucket_size``). 0 gathers each layer as it runs: the least memory per
    worker; larger values overlap gathering with compute (faster on GPUs, more memory)."""
    cache_max_gb: float = 20.0
    """``auto`` placement: the largest target cache (one arm, GB on disk) to choose ``cached``."""
    rung_every: int = 0
    """Every this many epochs, fine-tune a copy of the student for ``rung_epochs`` epochs on the
    labels and report its validation Dice (``rung/val_dice``): the intermediate results ASHA
    compares inside distillation in ``tskd tune`` (``tskd.stages.rungs``). 0: off. Needs
    validation images (``data.model_selection``)."""
    rung_epochs: int = 2
    """Fine-tuning epochs of each rung's copy (``student_finetune``'s batch size and lr)."""
    engine: EngineConfig = field(
        default_factory=lambda: EngineConfig(kind="auto", zero_stage=DISTILL_ZERO_STAGE))
    """Distillation runs under DeepSpeed (ZeRO stage ``DISTILL_ZERO_STAGE``) on GPU workers and
    under DDP on CPU workers by default (``auto``); ``kind: deepspeed`` forces DeepSpeed."""

    def validate(self, path: str) -> None:
        _check(self.rung_every >= 0, f"{path}.rung_every", self.rung_every, "an integer >= 0")
        _check(self.cache_max_gb >= 0, f"{path}.cache_max_gb", self.cache_max_gb,
               "a number >= 0")
        _check(self.rung_epochs >= 0, f"{path}.rung_epochs", self.rung_epochs,
               "an integer >= 0")
        _check(self.shard_persist_below >= 0, f"{path}.shard_persist_below",
               self.shard_persist_below, "an integer >= 0")
        _check(self.shard_prefetch >= 0, f"{path}.shard_prefetch", self.shard_prefetch,
               "an integer >= 0")
        _check(self.preset is None or self.preset in KD_PRESETS, f"{path}.preset", self.preset,
               f"null or one of {list(KD_PRESETS)}")
        _check(self.w_logits >= 0, f"{path}.w_logits", self.w_logits, "a number >= 0")
        _check(self.w_hidden >= 0, f"{path}.w_hidden", self.w_hidden, "a number >= 0")
        _check(self.w_logits + self.w_hidden > 0, f"{path}.w_logits", self.w_logits,
               "w_logits and w_hidden not both 0")
        _check_loop(self, path, "epochs", "batch_size", "lr", "warmup_epochs")


FINETUNE_AUTO: dict[str, tuple[float, float]] = {
    "vit": (1e-4, 0.05),
    "timm_unet": (1e-3, 1e-4),
    "basic_unet": (1e-3, 1e-4),
    "segresnet": (1e-3, 1e-4),
}
"""``student.arch`` -> (AdamW lr, weight decay) of its fine-tuning where ``student_finetune.lr`` /
``weight_decay`` are ``auto``: the ViT's is the paper's fine-tuning (lr 1e-4, weight decay 0.05);
the convolutional students are trained as the label-only reference is (lr 1e-3, weight decay
1e-4, MONAI's usual for U-Nets). With the ViT's settings a BasicUNet student from scratch reached
0.565 test Dice on the demo, the same network as the reference 0.868 (benchmarks/README.md)."""


@dataclass
class StudentFinetuneConfig:
    """Fine-tuning of a student on the labelled subset (0.2·CE + 0.8·Dice)."""

    epochs: int = 20
    batch_size: int = 8
    lr: float | Literal["auto"] = "auto"
    """A number, or ``auto``: by ``student.arch`` (:data:`FINETUNE_AUTO`)."""
    weight_decay: float | Literal["auto"] = "auto"
    """A number, or ``auto``: by ``student.arch`` (:data:`FINETUNE_AUTO`)."""
    warmup_epochs: float = 1.0
    engine: EngineConfig = field(default_factory=EngineConfig)

    def resolved(self, arch: str) -> StudentFinetuneConfig:
        """This config with ``auto`` replaced by ``arch``'s values (:data:`FINETUNE_AUTO`)."""
        lr, weight_decay = FINETUNE_AUTO[arch]
        return replace(self, lr=lr if self.lr == "auto" else self.lr,
                       weight_decay=(weight_decay if self.weight_decay == "auto"
                                     else self.weight_decay))

    def validate(self, path: str) -> None:
        _check_loop(self, path, "epochs", "batch_size", "warmup_epochs")
        _check(self.lr == "auto" or self.lr > 0, f"{path}.lr", self.lr, "'auto' or a number > 0")
        _check(self.weight_decay == "auto" or self.weight_decay >= 0, f"{path}.weight_decay",
               self.weight_decay, "'auto' or a number >= 0")


@dataclass
class ImagenetMaeConfig:
    """The ``imagenet_mae`` arm: the student's ViT starts from an ImageNet MAE checkpoint (the
    paper: MAE-lite's ViT-Tiny, 400 epochs on ImageNet); its FPN head starts at random."""

    checkpoint: str | None = None
    """A ViT checkpoint in timm layout (plain state dict, or under ``model``/``state_dict``; the
    official MAE files) or MAE-lite layout (``model`` with ``module.model.`` prefixes). The MAE
    decoder and any classification head are dropped."""
    mismatch: Literal["interpolate", "skip"] = "interpolate"
    """When the checkpoint's position embeddings (input size) or patch embedding (patch size) do
    not fit the student: ``interpolate`` resamples them (timm ``resample_abs_pos_embed`` /
    ``resample_patch_embed``); ``skip`` leaves them at random init, as the paper did ("did not
    load the first layer of tokens"). The stage reports which keys went which way."""

    def validate(self, path: str) -> None:
        pass


@dataclass
class MaeConfig:
    """The ``mae`` arm: MAE pre-training of the student's ViT on the transfer set (paper 4.2.1:
    mask ratio 0.75, batch 64, AdamW base lr 1.5e-4, weight decay 0.05, cosine, 1,600 epochs).
    Then the usual fine-tuning on the labels."""

    epochs: int = 3
    """Demo scale (the paper: 1,600)."""
    batch_size: int = 64
    """Per worker; the global batch is ``batch_size × ray.num_workers``."""
    base_lr: float = 1.5e-4
    """The learning rate is ``base_lr × global batch / 256`` (MAE's linear scaling rule)."""
    weight_decay: float = 0.05
    """AdamW (betas 0.9, 0.95); not applied to biases and norms, as MAE's code."""
    warmup_epochs: float = 1.0
    """Linear warm-up (epochs, may be fractional), then cosine decay."""
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    """Targets are each patch's pixels normalised by the patch's mean and std (MAE's recipe)."""
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    """A small decoder (MAE-lite's ViT-Tiny used a larger one); discarded after pre-training."""

    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self, path: str) -> None:
        _check_loop(self, path, "epochs", "batch_size", "warmup_epochs")
        _check(self.base_lr > 0, f"{path}.base_lr", self.base_lr, "a number > 0")
        _check(self.weight_decay >= 0, f"{path}.weight_decay", self.weight_decay, "a number >= 0")
        _check(0.0 < self.mask_ratio < 1.0, f"{path}.mask_ratio", self.mask_ratio,
               "a number in (0, 1)")
        _check(self.decoder_depth >= 1, f"{path}.decoder_depth", self.decoder_depth,
               "an integer >= 1")
        _check(self.decoder_heads >= 1 and self.decoder_dim % self.decoder_heads == 0
               and self.decoder_dim % 4 == 0, f"{path}.decoder_dim", self.decoder_dim,
               f"a multiple of 4 and of decoder_heads={self.decoder_heads}")


@dataclass
class MocoV3Config:
    """The ``mocov3`` arm: MoCo v3 pre-training of the student's ViT on the transfer set (paper
    4.2.1: batch 32, AdamW base lr 1.5e-4, weight decay 0.1, momentum 0.99, temperature 0.2,
    cosine, 1,600 epochs). Then the usual fine-tuning on the labels."""

    epochs: int = 3
    """Demo scale (the paper: 1,600)."""
    batch_size: int = 32
    """Per worker; the global batch is ``batch_size × ray.num_workers``."""
    base_lr: float = 1.5e-4
    """The learning rate is ``base_lr × global batch / 256`` (MoCo v3's code scales it so)."""
    weight_decay: float = 0.1
    warmup_epochs: float = 1.0
    """Linear warm-up (epochs, may be fractional), then cosine decay."""
    momentum: float = 0.99
    """EMA coefficient of the momentum encoder."""
    temperature: float = 0.2
    dim: int = 256
    """Output width of the projection and prediction heads (MoCo v3: 256)."""
    mlp_dim: int = 1024
    """Hidden width of both heads (MoCo v3: 4096; smaller for the ViT-Tiny demo)."""
    min_crop_scale: float = 0.08
    """Smallest random-resized-crop area of a view, as a share of the image."""
    freeze_patch_embed: bool = True
    """Keep the ViT's patch projection at its random init during MoCo v3 (the MoCo v3 ViT
    recipe's ``--stop-grad-conv1``, which its authors found stabilises training); it is trained
    in the fine-tuning that follows."""

    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self, path: str) -> None:
        _check_loop(self, path, "epochs", "batch_size", "warmup_epochs")
        _check(self.batch_size >= 2, f"{path}.batch_size", self.batch_size,
               "an integer >= 2 (InfoNCE needs negatives; BatchNorm needs 2 samples)")
        _check(self.base_lr > 0, f"{path}.base_lr", self.base_lr, "a number > 0")
        _check(self.weight_decay >= 0, f"{path}.weight_decay", self.weight_decay, "a number >= 0")
        _check(0.0 <= self.momentum < 1.0, f"{path}.momentum", self.momentum, "a number in [0, 1)")
        _check(self.temperature > 0, f"{path}.temperature", self.temperature, "a number > 0")
        _check(self.dim >= 1, f"{path}.dim", self.dim, "an integer >= 1")
        _check(self.mlp_dim >= 1, f"{path}.mlp_dim", self.mlp_dim, "an integer >= 1")
        _check(0.0 < self.min_crop_scale <= 1.0, f"{path}.min_crop_scale", self.min_crop_scale,
               "a number in (0, 1]")


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """MAE's and MoCo v3's linear scaling rule: ``base_lr × global_batch / 256``."""
    return base_lr * global_batch / 256


@dataclass
class ReferenceConfig:
    """A label-only reference network trained in every run (stage ``reference``): a student
    architecture trained from random init on the same labels, loss (0.2·CE + 0.8·Dice) and
    augmentation as the students, scored beside them. ``arch: none`` turns it off."""

    arch: str = "basic_unet"
    """``none`` or one of STUDENT_ARCHS."""
    encoder: str = "resnet18"
    """timm encoder when ``arch`` is ``timm_unet``."""
    img_size: int | None = None
    """Working size; null = ``data.image_size`` (with patches: the patch side)."""
    epochs: int = 20
    """Sized for the demo: BasicUNet at 128 px on 40 labels took ~5 s of single-thread CPU per
    epoch (train + validation), so an estimated 60-90 s for the stage with Ray's start-up on an
    idle 2-core machine. Validation Dice was still rising at epoch 16 of a 40-epoch run (0.866):
    give real datasets more epochs (benchmarks/README.md)."""
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    engine: EngineConfig = field(default_factory=EngineConfig)

    def student(self, data_image_size: int) -> StudentConfig:
        """The reference as a :class:`StudentConfig` (for ``tskd.models.students``)."""
        return StudentConfig(arch=self.arch, encoder=self.encoder,
                             img_size=self.img_size or data_image_size)

    def validate(self, path: str) -> None:
        _check(self.arch == "none" or self.arch in STUDENT_ARCHS, f"{path}.arch", self.arch,
               f"'none' or one of {list(STUDENT_ARCHS)}")
        _check_loop(self, path, "epochs", "batch_size", "lr", "warmup_epochs")


@dataclass
class CheckConfig:
    """Quality gates (stages ``teacher_check``, ``check_distill_ts_kd``): a model is scored on
    the validation images (the labelled training images without model selection) before
    another learns from it; ``tskd.quality``."""

    enabled: bool = True
    min_dice: float = 0.0
    """A fixed floor: the model's Dice must be above it (and above the baselines)."""
    baseline_epochs: int = 2
    """Epochs of the tiny scratch U-Net (~0.5M parameters, at ``data.image_size``, no
    augmentation, Adam lr 2e-3, batch 8) trained on the same labels as a floor for the teacher;
    0 = none. A sanity floor, not the label-only reference: measured on the validation images
    (32 + 8 labels, 128 px) it reached 0.41 / 0.55 / 0.59 Dice after 1 / 2 / 3 epochs on the
    ultrasound demo (whose LoRA teacher has 0.67) and 0.41 / 0.55 / 0.63 / 0.71 after 1 / 2 /
    3 / 5 on the vessel demo (teacher 0.29)."""
    student: bool = False
    """Also check the TS-KD student right after distillation (when ``distill.w_logits`` > 0):
    its logits must beat an all-background prediction and ``min_dice`` (it has seen no label,
    so the scratch baseline is not its floor). Off by default: after the demo's 3 distillation
    epochs the student's logits still predict only background (Dice 0.0000 on 2026-11-28), and
    fine-tuning on the labels is what makes it a segmenter; turn it on for long distillations."""
    on_fail: Literal["stop", "continue"] = "stop"
    """``stop``: a failed check stops the run with a message naming the numbers and likely
    causes; ``continue``: go on, and ``results.json`` and the printed table say so."""

    def validate(self, path: str) -> None:
        _check(0.0 <= self.min_dice < 1.0, f"{path}.min_dice", self.min_dice,
               "a number in [0, 1)")
        _check(self.baseline_epochs >= 0, f"{path}.baseline_epochs", self.baseline_epochs,
               "an integer >= 0 (0: no scratch baseline)")


@dataclass
class EvaluateConfig:
    """Evaluation on the test split."""

    batch_size: int = 16
    convention: Literal["tskd", "samed"] = "tskd"
    """Empty-mask rule of Dice / HD95 / mIoU (``tskd.metrics``): ``tskd`` skips a class absent
    from both prediction and ground truth and scores a one-sided miss as Dice 0 / HD95 = image
    diagonal; ``samed`` is SAMed's and TransUNet's ``calculate_metric_percase`` (prediction only:
    Dice 1, HD95 0; prediction empty: Dice 0, HD95 0), for numbers comparable with their tables."""
    miou_background: bool = False
    """Include the background class in the mIoU (Dice and HD95 are foreground-only always)."""

    def validate(self, path: str) -> None:
        _check_loop(self, path, "batch_size")


@dataclass
class RayConfig:
    """Where and how the stages run."""

    address: str | None = None
    """Ray cluster address; null uses RAY_ADDRESS or starts a local Ray."""
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    torch_threads: int = 0
    """Intra-op threads per worker; 0 = the node's CPUs divided by the workers (CPU runs)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend; auto = nccl with GPUs, gloo on CPU."""
    deterministic: bool = True
    """Same seed, same numbers: Ray Data datasets fed to training workers are sorted by their
    ``id`` column and streamed in order (``preserve_order``, which also turns off locality-aware
    sharding; see ``materialize_share`` for when the sort runs once), and workers call ``torch.use_deterministic_algorithms(True, warn_only=True)``
    (GPU: with ``CUBLAS_WORKSPACE_CONFIG=:4096:8``). Costs a sort of the transfer set per
    training run (or per epoch, when it is streamed) and, on GPUs, slower deterministic kernels; false streams in arrival order.
    Results still depend on ``torch_threads`` (the default 0 follows the machine's CPUs)."""
    materialize_share: float = 0.25
    """The transfer set (or teacher-target cache) a training stage iterates every epoch is read
    once into the object store when its uncompressed size (Parquet metadata) is at most this
    share of the cluster's object store memory (sorted by ``id`` once, with ``deterministic``);
    larger ones stream from storage every epoch. 0 = always stream. Placement only: not in any
    fingerprint (the rows and their order are the same either way)."""
    checkpoint_every: int = 1
    """Training stages checkpoint their whole state (model, optimiser, scheduler, epoch, RNG)
    every this many epochs (and at the last), so a restarted worker group or a re-run
    ``tskd run`` resumes there."""
    keep_checkpoints: int = 2
    """Checkpoints kept per training run (the latest ones)."""
    max_failures: int = 0
    """Worker-group failures a training run survives (Ray Train ``FailureConfig``): each one
    restarts the workers from the last checkpoint. 0 (default): the first failure fails the
    stage — Ray 2.60 retries every worker error, also tskd's own deterministic ones (a bad
    dataset or checkpoint), so a local run does not pay for retries; set it on clusters, where
    workers get lost (``jobs/kidneyus_vit_b.yaml``: 3). A re-run resumes either way."""
    concurrent_stages: int = 2
    """Stages that do not read each other (the students' arms, the scratch baseline and the
    reference beside the teacher) run at the same time, up to this many, when the cluster holds
    all their training workers at once: GPU workers by their GPUs (``num_workers``, ``use_gpu``)
    and ``cpus_per_worker``; CPU workers by the cores their torch threads use (``num_workers`` x
    ``torch_threads``; the default 0 takes every core of a node, so CPU stages then run one at a
    time: two stages' threads on the same cores measured 1.6x slower than in turn). Stages that
    feed Ray Data to their workers (transfer set, teacher targets, distillation, MAE / MoCo
    pre-training) always run alone: their data tasks and actor pools take the CPUs that are
    free. A stage whose entry exists is reused at once, whatever runs. 1 runs every stage alone,
    in plan order. Each stage keeps its own torch threads, so its numbers do not depend on this.
    Scheduling only: not in any fingerprint."""
    train_poll_s: float = 0.25
    """How often each Ray Train controller polls its workers (Train V2's
    ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default), handed to every Train run tskd
    starts. A worker's ``ray.train.report`` (each epoch's metrics and checkpoint) waits until a
    poll takes the previous one (Train V2 queues one), and a finished run is seen at the next
    poll: with the demo's 2-s epochs Ray's 2 s cost seconds per stage
    (``benchmarks/train_overhead.py``). Scheduling only: not in any fingerprint."""
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each training worker also requires, e.g. ``{worker_node: 0.01}`` to
    place training on the nodes that declare that resource (``ray start --resources``). CPU and
    GPU come from ``cpus_per_worker`` / ``use_gpu``. Placement only: not in any fingerprint."""

    def validate(self, path: str) -> None:
        for name, amount in self.resources_per_worker.items():
            _check(name not in ("CPU", "GPU", "memory", "object_store_memory"),
                   f"{path}.resources_per_worker.{name}", amount,
                   "custom resources only (CPU/GPU: cpus_per_worker, use_gpu)")
            _check(amount > 0, f"{path}.resources_per_worker.{name}", amount, "a number > 0")
        _check(self.num_workers >= 1, f"{path}.num_workers", self.num_workers, "an integer >= 1")
        _check(self.cpus_per_worker > 0, f"{path}.cpus_per_worker", self.cpus_per_worker,
               "a number > 0")
        _check(self.torch_threads >= 0, f"{path}.torch_threads", self.torch_threads,
               "an integer >= 0")
        _check(not (self.backend == "nccl" and not self.use_gpu), f"{path}.backend",
               self.backend, "'gloo' or 'auto' when use_gpu is false")
        _check(0.0 <= self.materialize_share <= 1.0, f"{path}.materialize_share",
               self.materialize_share, "a number in [0, 1] (0 = always stream)")
        _check(self.checkpoint_every >= 1, f"{path}.checkpoint_every", self.checkpoint_every,
               "an integer >= 1")
        _check(self.keep_checkpoints >= 1, f"{path}.keep_checkpoints", self.keep_checkpoints,
               "an integer >= 1")
        _check(self.max_failures >= 0, f"{path}.max_failures", self.max_failures,
               "an integer >= 0")
        _check(self.concurrent_stages >= 1, f"{path}.concurrent_stages",
               self.concurrent_stages, "an integer >= 1 (1: one stage at a time)")
        _check(0 < self.train_poll_s <= 60, f"{path}.train_poll_s", self.train_poll_s,
               "seconds in (0, 60]")


@dataclass
class ExperimentConfig:
    """A whole TS-KD experiment. ``tskd run`` with no config runs these defaults: the demo."""

    experiment: str = "demo"
    output_dir: str = "runs"
    """A local directory or shared mount, or an object-store URI (``s3://bucket/prefix``,
    ``gs://``, ``abfs://``; credentials from the environment only, see :mod:`tskd.storage`)."""
    mirror_dir: str = "~/.cache/tskd/mirror"
    """Each node's local copy of an object-store ``output_dir`` (unused for local ones)."""
    seed: int = 0
    students: list[str] = field(default_factory=lambda: list(DEFAULT_ARMS))
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    student_finetune: StudentFinetuneConfig = field(default_factory=StudentFinetuneConfig)
    imagenet_mae: ImagenetMaeConfig = field(default_factory=ImagenetMaeConfig)
    mae: MaeConfig = field(default_factory=MaeConfig)
    mocov3: MocoV3Config = field(default_factory=MocoV3Config)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    check: CheckConfig = field(default_factory=CheckConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self, path: str = "") -> None:
        _check(bool(self.experiment) and all(c.isalnum() or c in "-_." for c in self.experiment),
               "experiment", self.experiment, "a non-empty name of letters, digits, '-', '_', '.'")
        scheme = self.output_dir.split("://", 1)[0].lower() if "://" in self.output_dir else None
        _check(scheme in (None, "file", *REMOTE_SCHEMES)
               and (scheme in (None, "file") or len(self.output_dir.split("://", 1)[1]) > 0),
               "output_dir", self.output_dir,
               "a local path or a URI s3://bucket/prefix, gs://..., abfs://... "
               f"(schemes: file, {', '.join(REMOTE_SCHEMES)})")
        _check(bool(self.mirror_dir) and "://" not in self.mirror_dir, "mirror_dir",
               self.mirror_dir, "a local directory")
        _check(len(self.students) > 0 and all(s in STUDENT_ARMS for s in self.students)
               and len(set(self.students)) == len(self.students),
               "students", self.students, f"a non-empty list of distinct names from {list(STUDENT_ARMS)}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate(f.name)
        if "ta_kd" in self.students:  # task-agnostic KD trains on the hidden term alone
            _check(self.distill.w_hidden > 0, "distill.w_hidden", self.distill.w_hidden,
                   "a number > 0 while students include 'ta_kd' (task-agnostic KD uses only the "
                   "hidden-state term; drop 'ta_kd' from students to distil with logits only)")
        if self.distill.rung_every > 0:
            _check(self.data.model_selection, "distill.rung_every", self.distill.rung_every,
                   "0 while data.model_selection is false (rungs report validation Dice)")
        if self.student.arch != "vit":
            _check(self.distill.student_block == -1, "distill.student_block",
                   self.distill.student_block, f"-1 for student.arch {self.student.arch!r} (it has "
                   "one hidden map; only the vit student selects a block)")
        vit_only = [s for s in self.students if s in VIT_ONLY_ARMS]
        _check(not vit_only or self.student.arch == "vit", "students", self.students,
               f"no {vit_only} with student.arch={self.student.arch!r}: those arms initialise "
               "a ViT (student.arch 'vit'); drop them or use the ViT student")
        if "imagenet_mae" in self.students:
            _check(self.imagenet_mae.checkpoint is not None, "imagenet_mae.checkpoint", None,
                   "the path of a ViT MAE checkpoint (timm or MAE-lite layout) while students "
                   "include 'imagenet_mae'")
        if self.reference.arch != "none":  # its size rules are the student's (null img_size: data's)
            # data.image_size auto: the plan picks a multiple of 32 (every arch's rule); the
            # config is validated again once it is resolved
            size = 256 if self.data.image_size == "auto" else self.data.patch
            try:
                self.reference.student(size).validate("reference")
            except ConfigError as err:
                if (self.reference.img_size is None and self.data.image_size != "auto"
                        and self.data.patches):
                    raise ConfigError(f"{err} (reference.img_size null: the reference trains "
                                      f"on the data.patch_size={size} patches)") from None
                raise
        for path, engine in self.engines().items():
            engine.validate(path, use_gpu=self.ray.use_gpu)

    def engines(self) -> dict[str, EngineConfig]:
        """Every training stage's engine section, by dotted path."""
        return {"teacher.finetune.engine": self.teacher.finetune.engine,
                "transfer.diffusion.engine": self.transfer.diffusion.engine,
                "distill.engine": self.distill.engine,
                "student_finetune.engine": self.student_finetune.engine,
                "reference.engine": self.reference.engine,
                "teacher.pretrain.engine": self.teacher.pretrain.engine,
                "mae.engine": self.mae.engine, "mocov3.engine": self.mocov3.engine}

    @property
    def run_dir(self) -> Path:
        """The run's local directory: under ``output_dir``, or for an object-store output
        under this node's mirror of it (uploaded by the store)."""
        from tskd.storage import is_remote, local_path, mirror_root

        if is_remote(self.output_dir):
            return mirror_root(self.output_dir, self.mirror_dir) / self.experiment
        return local_path(self.output_dir) / self.experiment


# ----------------------------------------------------------------------------------------------
# Loading: dict/YAML -> dataclasses, with dotted errors
# ----------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(get_args(tp)[0])} to {_type_name(get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


_YAML11_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
"""A number in exponent notation (``3e-4``, ``1.5e3``, ``1E3``). YAML 1.2 reads every such
number as a float; PyYAML (YAML 1.1) reads it as a string unless the mantissa has a dot and the
exponent a sign (``3.0e-4``)."""


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats; where a
    float is allowed, exponent notation that PyYAML left a string is read as one)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: invalid value {value!r}; allowed: a mapping of "
                              f"{[f.name for f in dataclasses.fields(tp)]}")
        return _from_dict(tp, value, path)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{path}: invalid value {value!r}; allowed: {_type_name(tp)}")
    if origin is Literal:
        if value in get_args(tp):
            return value
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(v, get_args(tp)[0], f"{path}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            key_tp, value_tp = get_args(tp)
            return {_coerce(k, key_tp, f"{path} key {k!r}"):
                    v if value_tp is Any else _coerce(v, value_tp, f"{path}.{k}")
                    for k, v in value.items()}
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 (PyYAML) reads 3e-4 and 1E3 as strings
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - only the types above are used in the configs
        raise TypeError(f"unsupported config annotation {tp!r} at {path}")
    raise ConfigError(f"{path}: invalid value {value!r}; allowed: {_type_name(tp)}")


def _from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{path}." if path else ""
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; allowed keys"
                          f"{' of ' + path if path else ''}: {names}")
    defaults = {f.name: f.default_factory for f in dataclasses.fields(cls)
                if f.default_factory is not dataclasses.MISSING}
    kwargs = {}
    for k, v in data.items():
        if isinstance(v, dict) and dataclasses.is_dataclass(hints[k]) and k in defaults:
            # a partial section fills in from the field's own default (e.g. distill.engine's
            # kind is deepspeed, whatever EngineConfig's class default is)
            v = _merge(dataclasses.asdict(defaults[k]()), v)
        kwargs[k] = _coerce(v, hints[k], f"{prefix}{k}")
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``"a.b=3"`` -> ``{"a": {"b": 3}}``; the value is parsed as YAML (``null``, lists...)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. distill.w_logits=0.2")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected a dotted key such as teacher.lora.rank")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {exc}") from None
    return nest(key, value)


def nest(key: str, value: Any) -> dict[str, Any]:
    """``("a.b", 3)`` -> ``{"a": {"b": 3}}``."""
    node: dict[str, Any] = {}
    cursor = node
    parts = key.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return node


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Build and validate a config from a (possibly partial) nested dict of values."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    cfg = _from_dict(ExperimentConfig, _apply_kd_preset(data))
    cfg.validate()
    return cfg


def _apply_kd_preset(data: dict[str, Any]) -> dict[str, Any]:
    """Fill the fields a ``distill.preset`` sets. A field given the preset's value or the built-in
    default (a config written out in full, e.g. ``jobs/demo.yaml`` or a resolved config) takes
    the preset's value; any other value is an error naming both."""
    distill = data.get("distill")
    if not isinstance(distill, dict) or distill.get("preset") is None:
        return data
    name = distill["preset"]
    if name not in KD_PRESETS:
        raise ConfigError(f"distill.preset: invalid value {name!r}; allowed: null or one of "
                          f"{list(KD_PRESETS)}")
    defaults = DistillConfig()
    for key, value in KD_PRESETS[name].items():
        if key in distill and distill[key] not in (value, getattr(defaults, key)):
            raise ConfigError(f"distill.{key}: invalid value {distill[key]!r}; allowed: "
                              f"{value!r}, the value distill.preset={name!r} sets (or drop the "
                              "preset)")
    return {**data, "distill": {**distill, **KD_PRESETS[name]}}


def load_config(path: str | Path | None = None,
                overrides: typing.Sequence[str] = ()) -> ExperimentConfig:
    """Defaults ← YAML file (values only) ← ``--set`` overrides; validated.

    Raises:
        ConfigError: unknown key, wrong type or out-of-range value, naming the dotted field
            (and the file when it comes from one).
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        data = read_yaml_mapping(path, "config file")
    for text in overrides:
        data = _merge(data, parse_override(text))
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        if path is not None:
            raise ConfigError(f"{path}: {exc}") from None
        raise


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """The mapping a YAML file of values holds (empty file: ``{}``); errors name the file."""
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return loaded


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for manifests and Ray worker configs)."""
    return dataclasses.asdict(cfg)


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able values (config slices, upstream fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
