"""The training engine seam (no Ray): torch and DeepSpeed (ZeRO 0, 2) train the same distilled
student as a hand-written PyTorch loop; ZeRO-3 consolidates; checkpoints restore the state."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch

from tskd.config import EngineConfig, to_dict
from tskd.stages.engine import build_engine, deepspeed_config

STEPS, BATCH, LR, WD = 4, 4, 1e-3, 0.05
TOL = dict(rtol=1e-4, atol=1e-5, equal_nan=True)
"""torch vs DeepSpeed after 4 AdamW steps of lr 1e-3 (weights move by up to ~4e-3): ZeRO-0 runs
the same torch AdamW on the same tensors; ZeRO-2/3 step flattened fp32 partitions and reduce
gradients in buckets, so rounding differs (measured: at most 2e-6 on a few biases, where Adam's
normalisation of near-zero gradients amplifies it). 1e-5 is 0.25% of the movement."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def process_group():
    """A one-rank gloo process group, as Ray Train gives a one-worker run."""
    import torch.distributed as dist

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                      DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _distillation() -> tuple[torch.nn.Module, list]:
    """The distillation stage's module (tiny ViT student + KD loss with its projection) and
    fixed teacher targets for STEPS batches."""
    from tskd.losses import KDLoss
    from tskd.models.students import build_student
    from tskd.stages.distill import Distillation

    torch.manual_seed(0)
    student = build_student({"arch": "vit", "model_name": "vit_tiny_patch16_224",
                             "img_size": 32, "patch_size": 16, "decoder_dim": 16,
                             "encoder": "resnet18"}, 3)
    kd = KDLoss(student.hidden_dim, 8, w_logits=0.2, w_hidden=0.1)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(BATCH, 3, 32, 32, generator=g) * 255,
                (torch.randn(BATCH, 3, 8, 8, generator=g), torch.randn(BATCH, 8, 2, 2, generator=g)))
               for _ in range(STEPS)]
    return Distillation(student, kd), batches


def _schedule(opt, per_epoch, total):
    from diffusers.optimization import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(opt, 1, total)


def _reference(model, batches):
    """Hand-written PyTorch: AdamW, warm-up + cosine, one step per batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    sched = _schedule(opt, STEPS, STEPS)
    for images, target in batches:
        loss, _ = model(images, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.state_dict()


def _engine(model, **engine):
    cfg = to_dict(EngineConfig(**engine))
    return build_engine(model, cfg, lr=LR, weight_decay=WD, batch_size=BATCH,
                        steps_per_epoch=STEPS, epochs=1, device=torch.device("cpu"),
                        schedule=_schedule)


def _run(engine, batches):
    for images, target in batches:
        loss, _ = engine(images, target)
        engine.step(loss)
    return engine.state_dict()


SLOW = pytest.mark.slow  # ZeRO-2/3 steps take seconds each on a loaded 2-core machine


@pytest.mark.parametrize("engine", [{"kind": "torch"},
                                    {"kind": "deepspeed", "zero_stage": 0},
                                    pytest.param({"kind": "deepspeed", "zero_stage": 2},
                                                 marks=SLOW)],
                         ids=["torch", "zero0", "zero2"])
def test_engines_distil_the_same_student(process_group, engine):
    model, batches = _distillation()
    expected = _reference(copy.deepcopy(model), batches)
    initial = copy.deepcopy(model.state_dict())
    got = _run(_engine(model, **engine), batches)
    assert got.keys() == expected.keys()
    moved = max(float((expected[k] - initial[k]).abs().max()) for k in expected)
    assert moved > 1e-4  # the steps did change the weights
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], **TOL, msg=key)


def test_gradient_accumulation_equals_the_larger_batch(process_group):
    model, batches = _distillation()
    # reference: one step on the two micro-batches' mean loss (equal sizes: the big batch)
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=WD)
    for i in range(0, STEPS, 2):
        loss = sum(ref(*batches[j])[0] for j in (i, i + 1)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    for kind in ("torch", "deepspeed"):
        m = copy.deepcopy(model)
        eng = build_engine(m, to_dict(EngineConfig(kind=kind, gradient_accumulation=2)),
                           lr=LR, weight_decay=WD, batch_size=BATCH, steps_per_epoch=STEPS,
                           epochs=1, device=torch.device("cpu"))
        got = _run(eng, batches)
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(got[key], value, **TOL, msg=f"{kind} {key}")


@SLOW
def test_zero3_state_dict_is_consolidated(process_group):
    model, batches = _distillation()
    expected = _reference(copy.deepcopy(model), batches)
    linear = torch.nn.functional.linear
    engine = _engine(model, kind="deepspeed", zero_stage=3)
    assert all(p.numel() == 0 for p in engine.module.parameters())  # partitioned
    # ZeRO-3 leaves the process's torch linear alone (later models in this worker rely on it)
    assert torch.nn.functional.linear is linear
    got = _run(engine, batches)
    assert set(got) == set(expected)
    for key in expected:
        assert got[key].shape == expected[key].shape
        torch.testing.assert_close(got[key], expected[key], **TOL, msg=key)


@pytest.mark.parametrize("engine", [{"kind": "torch"},
                                    pytest.param({"kind": "deepspeed", "zero_stage": 2},
                                                 marks=SLOW)],
                         ids=["torch", "zero2"])
def test_save_and_load_resume_the_same_run(process_group, tmp_path, engine):
    model, batches = _distillation()
    expected = _reference(copy.deepcopy(model), batches)
    first = _engine(copy.deepcopy(model), **engine)
    _run(first, batches[:2])
    first.save(tmp_path)
    resumed = _engine(copy.deepcopy(model), **engine)  # fresh weights, optimiser, schedule
    resumed.load(tmp_path)
    got = _run(resumed, batches[2:])
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], **TOL, msg=key)


def test_deepspeed_config_is_derived_from_the_typed_section():
    cfg = to_dict(EngineConfig(kind="deepspeed", zero_stage=3, gradient_accumulation=4,
                               clip_grad_norm=1.0, precision="bf16", optimizer="cpu_adam",
                               offload_optimizer=True, offload_params=True,
                               raw={"zero_optimization": {"reduce_bucket_size": 1000}}))
    assert deepspeed_config(cfg, 16) == {
        "train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 4,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 3, "memory_efficient_linear": False,
                              "offload_optimizer": {"device": "cpu"},
                              "offload_param": {"device": "cpu"}, "reduce_bucket_size": 1000},
        "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}


def test_ddpm_steps_through_the_engine_equal_train_ddpm():
    """The transfer stage's DDPM loop (DDPMData + ddpm_loss through a torch engine clipping at
    1, weight decay 0.01, warm-up + cosine) is train_ddpm's, step for step."""
    import numpy as np
    from diffusers.optimization import get_cosine_schedule_with_warmup

    from tskd.config import DiffusionConfig
    from tskd.diffusion import (DDPMData, build_scheduler, build_unet, ddpm_loss,
                                default_warmup, train_ddpm)

    dcfg = DiffusionConfig(image_size=16, block_out_channels=[8, 16], batch_size=3)
    images = np.random.default_rng(0).integers(0, 255, (5, 16, 16, 3), dtype=np.uint8)
    steps = 4
    ref_unet, sched = build_unet(dcfg, seed=1), build_scheduler(dcfg)
    ref_losses = train_ddpm(ref_unet, sched, images, steps=steps, batch_size=3, lr=1e-3, seed=2)
    unet = build_unet(dcfg, seed=1)
    engine = build_engine(unet, to_dict(dcfg.engine), lr=1e-3, weight_decay=0.01, batch_size=3,
                          steps_per_epoch=steps, epochs=1, device=torch.device("cpu"),
                          schedule=lambda opt, per_epoch, total: get_cosine_schedule_with_warmup(
                              opt, default_warmup(steps), steps))
    data = DDPMData(images, 16, seed=2, num_train_timesteps=dcfg.num_train_timesteps)
    losses = []
    for _ in range(steps):
        loss = ddpm_loss(engine, sched, *data.next_batch(3))
        engine.step(loss)
        losses.append(float(loss))
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    for key, value in ref_unet.state_dict().items():
        torch.testing.assert_close(engine.state_dict()[key], value, **TOL, msg=key)


def test_zero_buckets_are_capped_at_the_model_size():
    """DeepSpeed's 5e8-element buckets are allocated twice per ZeRO-2 step; for a model smaller
    than that the buckets hold the model (rounded up to a multiple of 1024), and ``raw`` still
    wins."""
    cfg = to_dict(EngineConfig(kind="deepspeed", zero_stage=2))
    zero = deepspeed_config(cfg, 8, numel=5_000_001)["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 5_000_192
    assert zero["reduce_bucket_size"] % 1024 == 0 and zero["reduce_bucket_size"] >= 5_000_001
    assert "reduce_bucket_size" not in deepspeed_config(cfg, 8, numel=10**9)["zero_optimization"]
    assert "reduce_bucket_size" not in deepspeed_config(cfg, 8)["zero_optimization"]
    raw = to_dict(EngineConfig(kind="deepspeed", zero_stage=2,
                               raw={"zero_optimization": {"reduce_bucket_size": 1000}}))
    assert deepspeed_config(raw, 8, numel=5_000_001)["zero_optimization"][
        "reduce_bucket_size"] == 1000


def test_a_partitioned_module_is_filled_from_a_plan_and_bad_plans_are_named(process_group):
    """``ShardedModule.build``: parts built inside ``partitioned()`` are ZeRO-3 parameters from
    the start; the plan's values (functions of the fresh value) land in them; a missing key or
    a value of another shape fails naming the key."""
    from tskd.stages.engine import ShardedModule, load_partitioned

    fresh, linear = {}, torch.nn.functional.linear

    def make(partitioned):
        torch.manual_seed(0)
        with partitioned():
            net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
        assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in net.parameters())
        return net

    def plan_of(net):
        want = {k: torch.full(tuple(getattr(p, "ds_shape", p.shape)), float(i))
                for i, (k, p) in enumerate(net.named_parameters())}
        return {k: (lambda current, k=k: fresh.setdefault(k, current.clone()) * 0 + want[k])
                for k in want}

    sharded = ShardedModule.build(make, plan_of, batch_size=2, device=torch.device("cpu"),
                                  persist_below=0)
    x = torch.rand(2, 4)
    out = sharded(x)
    assert set(fresh) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert fresh["0.weight"].shape == (3, 4)  # the plan saw the gathered fresh value
    # the reference: the same values in a plain module
    ref = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    with torch.no_grad():
        for i, p in enumerate(ref.parameters()):
            p.fill_(float(i))
    torch.testing.assert_close(out, ref(x))

    import deepspeed

    from tskd.stages.engine import KEEP_TORCH_LINEAR

    # DeepSpeed reads memory_efficient_linear from the config, over Init's own argument
    with deepspeed.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": 1,
                                                  "zero_optimization": {"stage": 3,
                                                                        **KEEP_TORCH_LINEAR}}):
        net = torch.nn.Linear(4, 3)
    assert torch.nn.functional.linear is linear  # nothing here swapped the process's F.linear
    with pytest.raises(ValueError, match="bias"):
        load_partitioned(net, {"weight": lambda c: c})
    with pytest.raises(ValueError, match=r"weight: value of shape \(4, 3\)"):
        load_partitioned(net, {"weight": lambda c: torch.zeros(4, 3), "bias": lambda c: c})
