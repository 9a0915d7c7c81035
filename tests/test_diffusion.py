"""The DDPM core: model size, schedule, training, deterministic sampling, save/load."""

import numpy as np
import pytest
import torch

from tskd.config import DiffusionConfig
from tskd.diffusion import (build_scheduler, build_unet, images_to_tensor, load_diffusion,
                            sample_images, sample_with_seeds, save_diffusion, tensor_to_images,
                            train_ddpm)

TINY = DiffusionConfig(image_size=16, block_out_channels=[16, 32], layers_per_block=1,
                       num_train_timesteps=1000)
COLOUR = np.array([200, 60, 120], np.uint8)


@pytest.fixture(scope="module")
def trained():
    """A tiny UNet trained on constant-colour images (a trivially learnable set)."""
    torch.set_num_threads(1)
    images = np.broadcast_to(COLOUR, (32, 20, 20, 3)).copy()  # resized to 16 px by train_ddpm
    unet, sched = build_unet(TINY, seed=0), build_scheduler(TINY)
    seen = []
    losses = train_ddpm(unet, sched, images, steps=60, batch_size=8, lr=2e-3, seed=0,
                        on_step=lambda s, l: seen.append((s, l)))
    return unet, sched, losses, seen


def test_default_unet_is_small_with_one_attention_block():
    cfg = DiffusionConfig()
    unet = build_unet(cfg)
    n = sum(p.numel() for p in unet.parameters())
    assert 0.5e6 <= n <= 2e6
    attn = [m for m in unet.modules() if type(m).__name__ == "Attention"]
    assert len(attn) == 1  # the mid block's, at the lowest resolution
    size = cfg.image_size
    assert unet.config.sample_size == size and unet.config.in_channels == 3
    out = unet(torch.zeros(1, 3, size, size), 10).sample
    assert out.shape == (1, 3, size, size)
    with pytest.raises(ValueError, match="divisible"):
        build_unet(DiffusionConfig(image_size=20, block_out_channels=[8, 8, 8, 8]))


def test_seeded_init_is_deterministic_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = build_unet(TINY, seed=3), build_unet(TINY, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb)


def test_scheduler_is_the_linear_ddpm_schedule():
    sched = build_scheduler(DiffusionConfig())
    betas = np.linspace(1e-4, 0.02, 1000)
    alpha_bar = np.cumprod(1 - betas)
    x0, eps = torch.full((1, 3, 2, 2), 0.5), torch.full((1, 3, 2, 2), -1.0)
    t = 500
    xt = sched.add_noise(x0, eps, torch.tensor([t]))
    expected = np.sqrt(alpha_bar[t]) * 0.5 - np.sqrt(1 - alpha_bar[t])
    np.testing.assert_allclose(xt.numpy(), expected, rtol=1e-5)


def test_image_scaling_round_trip():
    img = np.array([[[[0, 128, 255]]]], np.uint8)
    x = images_to_tensor(img, 1)
    np.testing.assert_allclose(x.flatten().numpy(), [-1.0, 128 / 127.5 - 1, 1.0], atol=1e-6)
    assert tensor_to_images(x).tolist() == img.tolist()


def test_training_loss_is_finite_and_decreases(trained):
    _, _, losses, seen = trained
    assert len(losses) == 60 and all(np.isfinite(losses))
    assert [s for s, _ in seen] == list(range(1, 61))
    assert [l for _, l in seen] == losses
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])


def test_training_is_deterministic_from_the_seed():
    images = np.broadcast_to(COLOUR, (8, 16, 16, 3)).copy()
    runs = []
    for _ in range(2):
        unet, sched = build_unet(TINY, seed=1), build_scheduler(TINY)
        runs.append(train_ddpm(unet, sched, images, steps=3, batch_size=4, lr=1e-3, seed=5))
    assert runs[0] == runs[1]


def test_sampling_shapes_determinism_and_batch_independence(trained):
    unet, sched, _, _ = trained
    a = sample_images(unet, sched, 5, num_inference_steps=4, seed=7, batch_size=5)
    assert a.shape == (5, 16, 16, 3) and a.dtype == np.uint8
    b = sample_images(unet, sched, 5, num_inference_steps=4, seed=7, batch_size=5)
    np.testing.assert_array_equal(a, b)
    c = sample_images(unet, sched, 5, num_inference_steps=4, seed=8, batch_size=5)
    assert not np.array_equal(a, c)
    # image k depends on (seed, k) only: a prefix is the same images
    np.testing.assert_array_equal(
        sample_images(unet, sched, 3, num_inference_steps=4, seed=7, batch_size=5), a[:3])
    # pad_batches: bit-identical however the seeds are split into batches and calls
    seeds = [11, 12, 13, 14, 15]
    whole = sample_with_seeds(unet, sched, seeds, num_inference_steps=3, batch_size=4,
                              pad_batches=True)
    parts = np.concatenate([
        sample_with_seeds(unet, sched, seeds[:1], num_inference_steps=3, batch_size=4,
                          pad_batches=True),
        sample_with_seeds(unet, sched, seeds[1:], num_inference_steps=3, batch_size=4,
                          pad_batches=True)])
    np.testing.assert_array_equal(whole, parts)
    # DDPM (stochastic per step) is deterministic from the seed too
    d1 = sample_images(unet, sched, 2, num_inference_steps=3, seed=7, sampler="ddpm")
    d2 = sample_images(unet, sched, 2, num_inference_steps=3, seed=7, sampler="ddpm")
    np.testing.assert_array_equal(d1, d2)
    with pytest.raises(ValueError, match="sampler"):
        sample_images(unet, sched, 1, num_inference_steps=2, seed=0, sampler="euler")


class _OracleEps(torch.nn.Module):
    """The exact epsilon-predictor for data that is always the colour ``c`` (in [-1, 1]):
    eps(x_t, t) = (x_t - sqrt(abar_t) c) / sqrt(1 - abar_t), with abar from the linear betas
    computed by hand. Any correct sampler must turn noise into exactly ``c``."""

    def __init__(self, colour, size):
        super().__init__()
        self.config = type("Cfg", (), {"sample_size": size})()
        self.c = torch.tensor(colour / 127.5 - 1.0, dtype=torch.float64).view(1, 3, 1, 1)
        self.abar = torch.tensor(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))

    def forward(self, x, t):
        a = self.abar[int(t)]
        eps = (x.double() - a.sqrt() * self.c) / (1 - a).sqrt()
        return type("Out", (), {"sample": eps.float()})()


@pytest.mark.parametrize("sampler,steps", [("ddim", 5), ("ddim", 25), ("ddpm", 25),
                                           ("ddpm", 1000)])
def test_sampler_with_an_oracle_model_returns_the_data(sampler, steps):
    oracle = _OracleEps(COLOUR.astype(np.float64), 8)
    x = sample_images(oracle, build_scheduler(DiffusionConfig()), 3, num_inference_steps=steps,
                      seed=0, sampler=sampler)
    assert x.shape == (3, 8, 8, 3)
    assert np.abs(x.astype(int) - COLOUR).max() <= 1


def test_save_load_round_trip(tmp_path, trained):
    unet, sched, _, _ = trained
    save_diffusion(unet, tmp_path / "m", sched)
    unet2, sched2 = load_diffusion(tmp_path / "m")
    assert type(sched2).__name__ == "DDPMScheduler"
    for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
                "prediction_type", "clip_sample"):
        assert sched2.config[key] == sched.config[key]
    a = sample_images(unet, sched, 3, num_inference_steps=3, seed=2)
    b = sample_images(unet2, sched2, 3, num_inference_steps=3, seed=2)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError):
        load_diffusion(tmp_path / "missing")


def test_ddpm_data_resumes_from_its_state():
    from tskd.diffusion import DDPMData

    images = np.random.default_rng(0).integers(0, 255, (5, 8, 8, 3), dtype=np.uint8)
    a = DDPMData(images, 8, seed=3, num_train_timesteps=10)
    for _ in range(3):  # 9 draws of 5 images: the state sits mid-permutation
        a.next_batch(3)
    state = a.state_dict()
    expected = [a.next_batch(3) for _ in range(3)]
    b = DDPMData(images, 8, seed=99, num_train_timesteps=10)
    b.load_state_dict(state)
    for got, want in zip((b.next_batch(3) for _ in range(3)), expected):
        for g, w in zip(got, want):
            assert torch.equal(g, w)
