"""A small unconditional DDPM (diffusers ``UNet2DModel`` + ``DDPMScheduler``) for the transfer set.

TS-KD trains a diffusion model on augmented labelled images and samples an unlabelled transfer set
from it. Everything here is plain PyTorch + diffusers (core layer, no Ray)::

    unet, sched = build_unet(cfg), build_scheduler(cfg)
    losses = train_ddpm(unet, sched, images, steps=..., batch_size=16, lr=2e-4, seed=0)
    samples = sample_images(unet, sched, 100, num_inference_steps=25, seed=0)

What it trains on is :func:`ddpm_training_images` (the labelled images, cropped with patch
training, then augmented copies): the ``ddpm`` stage trains on it and keeps it in its entry
(:meth:`DDPMTrainingImages.save`), where the ``transfer`` stage reads it back
(:meth:`DDPMTrainingImages.load`) as the privacy references of its samples.

Images cross this module as ``uint8 (N, H, W, 3)`` numpy arrays; the model works in [-1, 1].
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup

from tskd.config import DiffusionConfig, ExperimentConfig
from tskd.transfer_quality import resize_uint8

log = logging.getLogger(__name__)

__all__ = ["SAMPLERS", "DDPMTrainingImages", "ddpm_training_images", "build_unet",
           "build_scheduler", "train_ddpm", "DDPMData", "ddpm_loss", "build_ema", "check_loss",
           "default_warmup", "sample_images", "sample_with_seeds", "image_seed",
           "save_diffusion", "load_diffusion", "images_to_tensor", "tensor_to_images"]


SAMPLERS = ("ddpm", "ddim")


def _norm_groups(channels: Sequence[int]) -> int:
    for g in (32, 16, 8):
        if all(c % g == 0 for c in channels):
            return g
    return 1


@dataclass(frozen=True)
class DDPMTrainingImages:
    """What the DDPM trains on, from :func:`ddpm_training_images`.

    Attributes:
        labelled: ``uint8 (N·k, P, P, 3)``: the labelled training images at ``data.image_size``
            (``P``), or with patch training their ``k`` crops each at the patch side ``P``
            (image ``i``'s crops at ``i·k … i·k + k - 1``).
        augmented: ``uint8 (n_augmented, P, P, 3)``: the DDPM's training set; its first
            ``min(N·k, n_augmented)`` images are ``labelled`` unchanged
            (:func:`tskd.data.augment.augment_copies`).
        crops_per_image: ``k`` (1 without patch training).
        case_ids: the case of each ``labelled`` image (``N·k`` ids).
    """

    labelled: np.ndarray
    augmented: np.ndarray
    crops_per_image: int
    case_ids: list[str]

    def summary(self) -> dict[str, Any]:
        """Counts and size (``ddpm.json``)."""
        return {"n_train_images": len(self.labelled) // self.crops_per_image,
                "crops_per_image": self.crops_per_image, "n_crops": len(self.labelled),
                "n_augmented": len(self.augmented),
                "train_image_size": int(self.labelled.shape[1])}

    def save(self, path: str | Path) -> None:
        """One uncompressed ``.npz`` (the demo's 1,000 augmented 128-px copies: 47 MB, ~0.6 s
        to write or read on a loaded 2-core machine, against ~60 s to recompute them)."""
        np.savez(path, labelled=self.labelled, augmented=self.augmented,
                 crops_per_image=np.int64(self.crops_per_image),
                 case_ids=np.asarray(self.case_ids, dtype=str))

    @classmethod
    def load(cls, path: str | Path) -> "DDPMTrainingImages":
        """What :meth:`save` wrote (no pickle)."""
        with np.load(path, allow_pickle=False) as f:
            return cls(f["labelled"], f["augmented"], int(f["crops_per_image"]),
                       [str(c) for c in f["case_ids"]])


def ddpm_training_images(info: Any, case_ids: Sequence[str], cfg: ExperimentConfig
                         ) -> DDPMTrainingImages:
    """The DDPM's training images, deterministic from ``cfg.seed``: the cases ``case_ids`` (the
    labelled training split) read at ``data.image_size``; with patch training
    (``data.patches``) :func:`tskd.data.patches.patches_per_image` crops of each at the patch
    side (:func:`tskd.data.patches.crop_arrays`, ``data.fg_fraction`` centred on foreground);
    then ``transfer.diffusion.n_augmented`` augmented copies
    (``transfer.diffusion.augment_strength``).

    Args:
        info: the dataset (:class:`tskd.data.format.DatasetInfo`).
        case_ids: the labelled training cases, in split order.
    """
    from tskd.data.augment import augment_copies
    from tskd.data.dataset import load_arrays

    d = cfg.transfer.diffusion
    images, masks = load_arrays(info, list(case_ids), cfg.data.image_size)
    crops = 1
    if cfg.data.patches:  # the DDPM learns (and generates) patches
        from tskd.data.patches import crop_arrays, patches_per_image

        crops = patches_per_image(cfg.data.image_size, cfg.data.patch)
        images = crop_arrays(images, masks, patch=cfg.data.patch, per_image=crops,
                             fg_fraction=cfg.data.fg_fraction, seed=cfg.seed)
    log.info("the DDPM's training images: %d labelled %s of %d px, augmented to %d",
             len(images), "crops" if cfg.data.patches else "images", images.shape[1],
             d.n_augmented)
    augmented = augment_copies(images, d.n_augmented, seed=cfg.seed,
                               strength=d.augment_strength)
    return DDPMTrainingImages(images, augmented, crops,
                              [c for c in case_ids for _ in range(crops)])


def build_unet(cfg: DiffusionConfig, seed: int | None = None) -> UNet2DModel:
    """A small RGB ``UNet2DModel`` at ``cfg.image_size``.

    Plain ``DownBlock2D``/``UpBlock2D`` at every level (``len(cfg.block_out_channels) - 1``
    downsamplings) and a single self-attention block, the one in the mid block at the lowest
    resolution. Defaults ([32, 64, 64], 1 layer per block) give ~1.2M parameters.
    ``seed`` makes the initialisation deterministic without touching the global RNG.
    """
    channels = tuple(int(c) for c in cfg.block_out_channels)
    factor = 2 ** (len(channels) - 1)
    if cfg.image_size % factor:
        raise ValueError(f"image_size {cfg.image_size} must be divisible by 2**(levels-1) = "
                         f"{factor} for block_out_channels {list(channels)}")
    kwargs = dict(
        sample_size=cfg.image_size, in_channels=3, out_channels=3,
        block_out_channels=channels, layers_per_block=cfg.layers_per_block,
        down_block_types=("DownBlock2D",) * len(channels),
        up_block_types=("UpBlock2D",) * len(channels),
        mid_block_type="UNetMidBlock2D", add_attention=True,
        attention_head_dim=min(32, channels[-1]), norm_num_groups=_norm_groups(channels),
    )
    if seed is None:
        return UNet2DModel(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(**kwargs)


def build_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """The training noise schedule: linear betas 1e-4..0.02 over ``num_train_timesteps``,
    epsilon prediction, samples clipped to [-1, 1]."""
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule="linear",
                         prediction_type="epsilon", clip_sample=True)


def images_to_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    """``uint8 (N, H, W, 3)`` → ``float32 (N, 3, size, size)`` in [-1, 1] (resized if needed)."""
    images = resize_uint8(np.asarray(images), size)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """``float (N, 3, H, W)`` in [-1, 1] → ``uint8 (N, H, W, 3)``."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


class DDPMData:
    """The DDPM's training stream: batches drawn without replacement from per-epoch permutations
    of ``images`` (a batch may span two epochs), with their noise and timesteps, all from one
    ``torch.Generator`` seeded with ``seed``. :meth:`state_dict` / :meth:`load_state_dict` resume
    it exactly.

    Args:
        images: ``uint8 (N, H, W, 3)``; resized to ``size`` once, scaled to [-1, 1].
    """

    def __init__(self, images: np.ndarray, size: int, *, seed: int, num_train_timesteps: int
                 ) -> None:
        if len(images) == 0:
            raise ValueError("train_ddpm: no images")
        self.data = images_to_tensor(images, size)
        self.t_max = int(num_train_timesteps)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.perm, self.pos = torch.randperm(len(self.data), generator=self.gen), 0

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x0 (B, 3, S, S) in [-1, 1], noise (B, 3, S, S), timesteps (B,) int64)``."""
        n = len(self.data)
        parts, need = [], batch_size
        while need > 0:
            if self.pos == n:
                self.perm, self.pos = torch.randperm(n, generator=self.gen), 0
            take = min(need, n - self.pos)
            parts.append(self.perm[self.pos:self.pos + take])
            self.pos, need = self.pos + take, need - take
        x0 = self.data[torch.cat(parts)]
        noise = torch.randn(x0.shape, generator=self.gen)
        t = torch.randint(0, self.t_max, (len(x0),), generator=self.gen)
        return x0, noise, t

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "perm": self.perm.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.perm, self.pos = state["perm"].clone(), int(state["pos"])


def ddpm_loss(unet: UNet2DModel, scheduler: DDPMScheduler, x0: torch.Tensor,
              noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The epsilon-prediction MSE of one batch (tensors on the UNet's device)."""
    return F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)


def default_warmup(steps: int) -> int:
    """The DDPM's default linear warm-up: 5% of its steps."""
    return max(0, round(0.05 * steps))


def train_ddpm(unet: UNet2DModel, scheduler: DDPMScheduler, images: np.ndarray, *, steps: int,
               batch_size: int, lr: float, seed: int,
               on_step: Callable[[int, float], None] | None = None,
               device: str | torch.device = "cpu", warmup_steps: int | None = None,
               ema_decay: float = 0.0) -> list[float]:
    """Train ``unet`` in place with the epsilon-prediction MSE; return the per-step losses.

    Args:
        images: ``uint8 (N, H, W, 3)``; resized to ``unet.config.sample_size`` once, scaled to
            [-1, 1]. Batches come from :class:`DDPMData`.
        steps: optimiser steps (AdamW, weight decay 0.01 — diffusers' default — grad-norm clip 1).
        warmup_steps: linear warm-up of the cosine schedule; ``None`` = 5% of ``steps``.
        ema_decay: > 0 keeps an exponential moving average of the weights (diffusers
            ``EMAModel`` with its warm-up, capped at this decay) and copies it into ``unet`` at
            the end. 0 disables.
        on_step: ``on_step(step, loss)`` after every step, ``step`` counting from 1.

    Everything random (batches, timesteps, noise) comes from a ``torch.Generator`` seeded with
    ``seed``; the model initialisation is the caller's business (``build_unet(cfg, seed)``).
    The ``ddpm`` stage runs the same steps through its training engine
    (``tskd.stages.ddpm``); this is the plain-PyTorch version.
    """
    device = torch.device(device)
    data = DDPMData(images, int(unet.config.sample_size), seed=seed,
                    num_train_timesteps=scheduler.config.num_train_timesteps)
    unet.to(device).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    warmup = default_warmup(steps) if warmup_steps is None else int(warmup_steps)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=warmup,
                                            num_training_steps=steps)
    ema = build_ema(unet, ema_decay)
    losses: list[float] = []
    for step in range(1, steps + 1):
        x0, noise, t = (v.to(device) for v in data.next_batch(batch_size))
        loss = ddpm_loss(unet, scheduler, x0, noise, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            ema.step(unet.parameters())
        losses.append(check_loss(loss, step))
        if on_step is not None:
            on_step(step, losses[-1])
    if ema is not None:
        ema.copy_to(unet.parameters())
    unet.eval()
    return losses


def build_ema(unet: UNet2DModel, ema_decay: float):
    """diffusers ``EMAModel`` of ``unet``'s weights (warm-up, capped at ``ema_decay``), or
    ``None`` when ``ema_decay`` is 0."""
    if ema_decay <= 0:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(unet.parameters(), decay=ema_decay, use_ema_warmup=True, power=2 / 3,
                    foreach=True)


def check_loss(loss: torch.Tensor, step: int) -> float:
    """The loss as a float; ``FloatingPointError`` if it is not finite."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"train_ddpm: loss is {value} at step {step}")
    return value


def image_seed(seed: int, index: int) -> int:
    """The noise seed of image ``index`` of a run seeded with ``seed`` (a 63-bit mix, so
    neighbouring seeds and indices give unrelated streams)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(index) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB)
    x &= (1 << 64) - 1
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & ((1 << 64) - 1)
    x ^= x >> 32
    return x & ((1 << 63) - 1)


def _inference_scheduler(scheduler: DDPMScheduler, sampler: str):
    if sampler == "ddim":
        # same betas and clipping; eta = 0 (deterministic given the initial noise)
        return DDIMScheduler.from_config(scheduler.config)
    if sampler == "ddpm":
        return DDPMScheduler.from_config(scheduler.config)
    raise ValueError(f"sampler: invalid value {sampler!r}; allowed: {list(SAMPLERS)}")


@torch.no_grad()
def sample_with_seeds(unet: UNet2DModel, scheduler: DDPMScheduler, seeds: Sequence[int], *,
                      num_inference_steps: int, batch_size: int = 16,
                      device: str | torch.device = "cpu", sampler: str = "ddpm",
                      pad_batches: bool = False) -> np.ndarray:
    """One image per seed: ``uint8 (len(seeds), H, W, 3)`` at ``unet.config.sample_size``.

    Image ``k`` depends only on ``seeds[k]`` (its own ``torch.Generator`` draws its initial noise
    and, for DDPM, its per-step noise), not on its batch companions. CPU convolutions may round
    differently at different batch *sizes* (±1 grey level after 8-bit quantisation, measured);
    ``pad_batches=True`` pads the last batch to ``batch_size`` (repeating its first seed) so the
    UNet always runs at one batch size and every image is bit-identical however the seeds are
    split into calls. Sampling runs
    ``num_inference_steps`` steps of ``sampler``: ``"ddpm"`` (ancestral sampling on the strided
    timesteps, the default; see :func:`sample_images`) or ``"ddim"`` (η = 0).
    """
    device = torch.device(device)
    unet.to(device).eval()
    sched = _inference_scheduler(scheduler, sampler)
    sched.set_timesteps(num_inference_steps)
    size = int(unet.config.sample_size)
    out = []
    for start in range(0, len(seeds), batch_size):
        chunk = [int(s) for s in seeds[start:start + batch_size]]
        real = len(chunk)
        if pad_batches:
            chunk += [chunk[0]] * (batch_size - real)
        gens = [torch.Generator().manual_seed(s) for s in chunk]
        x = torch.cat([torch.randn((1, 3, size, size), generator=g) for g in gens]).to(device)
        for t in sched.timesteps:
            eps = unet(x, t).sample
            if sampler == "ddpm":
                x = sched.step(eps, t, x, generator=gens).prev_sample
            else:
                x = sched.step(eps, t, x).prev_sample
        out.append(tensor_to_images(x[:real]))
    if not out:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    return np.concatenate(out)


def sample_images(unet: UNet2DModel, scheduler: DDPMScheduler, n: int, *,
                  num_inference_steps: int, seed: int, batch_size: int = 16,
                  device: str | torch.device = "cpu", sampler: str = "ddpm") -> np.ndarray:
    """Sample ``n`` images, ``uint8 (n, H, W, 3)``, deterministic from ``seed``.

    Image ``k`` uses the noise seed :func:`image_seed` ``(seed, k)``, so a subset of indices can
    be sampled elsewhere (the Ray stage samples row ids on several actors) and the result does
    not depend on ``batch_size`` beyond float rounding (see :func:`sample_with_seeds`).

    Why DDPM by default (measured, 2026-11-22): a [32, 64, 64] UNet trained 600 steps (batch 16)
    on augmented demo ultrasound at 32 px — as under-trained as any CPU-budget model. DDPM
    ancestral sampling at 25 steps reproduces the fan-shaped field of view and the contrast
    (per-image std 46 vs 60 in the data, mean Laplacian 31 vs 32–35) and is indistinguishable
    from 250 DDPM steps; DDIM (η = 0) stays speckle-like with no structure at 10, 25 and even 100
    steps (std 28–31, Laplacian 40–46). Without the per-step noise, the model's epsilon errors
    are never corrected. DDIM remains available (``sampler="ddim"``) for well-trained models.
    """
    seeds = [image_seed(seed, k) for k in range(n)]
    return sample_with_seeds(unet, scheduler, seeds, num_inference_steps=num_inference_steps,
                             batch_size=batch_size, device=device, sampler=sampler)


def save_diffusion(unet: UNet2DModel, path_dir: str | Path,
                   scheduler: DDPMScheduler | None = None) -> Path:
    """Save to ``path_dir/unet`` and ``path_dir/scheduler`` with diffusers' ``save_pretrained``.

    Pass the training ``scheduler`` (its config is what :func:`load_diffusion` returns); ``None``
    saves a ``DDPMScheduler`` with diffusers' defaults (1,000 linear steps, as
    :func:`build_scheduler` with the default config).
    """
    path_dir = Path(path_dir)
    path_dir.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(path_dir / "unet", safe_serialization=True)
    (scheduler or DDPMScheduler()).save_pretrained(path_dir / "scheduler")
    return path_dir


def load_diffusion(path_dir: str | Path) -> tuple[UNet2DModel, DDPMScheduler]:
    """Load what :func:`save_diffusion` wrote (local files only, eval mode)."""
    path_dir = Path(path_dir)
    if not (path_dir / "unet").is_dir():
        raise FileNotFoundError(f"{path_dir}: no saved diffusion model (missing unet/)")
    unet = UNet2DModel.from_pretrained(path_dir / "unet", local_files_only=True)
    scheduler = DDPMScheduler.from_pretrained(path_dir / "scheduler", local_files_only=True)
    unet.eval()
    return unet, scheduler
