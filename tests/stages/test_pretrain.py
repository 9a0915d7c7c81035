"""The baseline arms under a real local Ray: MAE and MoCo v3 pre-training on the transfer set
(2 Ray Train workers, gloo) and the ImageNet-MAE initialisation from a checkpoint the test
writes; the MAE student is then fine-tuned from the pre-training stage's output. (The teacher
and evaluate stages are left out to keep it small; ``tests/stages/test_evaluate.py`` checks how
evaluate reports the pre-training cost.)"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tskd.config import load_config
from tskd.pipeline import run_pipeline

TINY = [
    "experiment=baselines", "students=[mae, mocov3, imagenet_mae]", "reference.arch=none",
    "data.demo.n_images=40", "data.demo.size=32", "data.image_size=32",
    "data.n_labels=8", "data.val_share=0.25",
    "teacher.arch=sam_tiny", "teacher.img_size=32",
    "transfer.n_images=8", "transfer.diffusion.image_size=16", "transfer.diffusion.n_augmented=8",
    "transfer.diffusion.train_steps=2", "transfer.diffusion.batch_size=4",
    "transfer.diffusion.num_inference_steps=2", "transfer.diffusion.block_out_channels=[32,32]",
    "transfer.sample_batch_size=4", "transfer.actor_cpus=0.5", "transfer.near_copy_psnr=99",
    "student.img_size=32", "student.patch_size=8", "student.decoder_dim=16",
    "mae.epochs=2", "mae.batch_size=4", "mae.decoder_dim=16", "mae.decoder_depth=1",
    "mae.decoder_heads=2",
    "mocov3.epochs=1", "mocov3.batch_size=4", "mocov3.dim=8", "mocov3.mlp_dim=16",
    "imagenet_mae.mismatch=skip",
    "student_finetune.epochs=1", "student_finetune.batch_size=4",
    "ray.num_workers=2", "ray.cpus_per_worker=0.5", "ray.torch_threads=1",
]


@pytest.mark.slow
def test_baseline_arms_pretrain_and_finetune(tmp_path, ray_local):
    import timm

    # an "ImageNet" ViT-Tiny MAE checkpoint in MAE-lite layout: 224 px, patch 16 (the student
    # works at 32 px with patch 8, so its patch and position embeddings do not fit)
    torch.manual_seed(5)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    ckpt = tmp_path / "mae_tiny_400e.pth.tar"
    torch.save({"model": {f"module.model.{k}": v for k, v in vit.state_dict().items()}
                | {"module.model.mask_token": torch.zeros(1, 1, 8)}}, ckpt)
    cfg = load_config(None, TINY + [f"output_dir={tmp_path / 'runs'}",
                                    f"imagenet_mae.checkpoint={ckpt}",
                                    f"teacher.pretrain.cache_dir={tmp_path / 'cache'}"])
    metrics = run_pipeline(cfg, only=["pretrain_mocov3", "init_imagenet_mae", "student_mae"])
    assert list(metrics) == ["data", "ddpm", "transfer", "pretrain_mae", "student_mae",
                             "pretrain_mocov3", "init_imagenet_mae"]
    run = cfg.run_dir

    # pre-training: the loss per epoch, the loop's time, the scaled learning rate
    for arm in ("mae", "mocov3"):
        m = metrics[f"pretrain_{arm}"]
        assert math.isfinite(m["pretrain/loss"]) and m["pretrain/loss"] > 0
        assert 0 < m["pretrain/train_time_s"] <= m["pretrain/fit_time_s"]
    assert metrics["pretrain_mae"]["pretrain/lr"] == pytest.approx(1.5e-4 * 4 * 2 / 256)
    assert metrics["pretrain_mocov3"]["pretrain/lr"] == pytest.approx(1.5e-4 * 4 * 2 / 256)
    manifest = json.loads((run / "pretrain_mae" / "manifest.json").read_text())
    assert manifest["metrics"]["pretrain/train_time_s"] > 0 and manifest["wall_time_s"] > 0

    # the MAE-pretrained ViT differs from where it started (ranks are synced by DDP; the FPN
    # head is untouched): compare blocks with the student the worker of rank 0 built
    from tskd.models.students import build_student
    from tskd.config import to_dict

    torch.manual_seed(cfg.seed)
    start = build_student(to_dict(cfg.student), 3).state_dict()
    mae = torch.load(run / "pretrain_mae" / "student.pt", weights_only=True)
    assert not torch.equal(mae["backbone.blocks.0.attn.qkv.weight"],
                           start["backbone.blocks.0.attn.qkv.weight"])

    # ImageNet-MAE: the blocks are the checkpoint's; the first layer of tokens was skipped
    init = torch.load(run / "init_imagenet_mae" / "student.pt", weights_only=True)
    for key in ("blocks.0.attn.qkv.weight", "blocks.11.mlp.fc2.weight", "norm.bias"):
        torch.testing.assert_close(init[f"backbone.{key}"], vit.state_dict()[key], rtol=0, atol=0)
    load = json.loads((run / "init_imagenet_mae" / "checkpoint_load.json").read_text())
    assert sorted(load["skipped"]) == ["patch_embed.proj.weight", "pos_embed"]
    assert load["dropped"] == ["mask_token"]
    assert metrics["init_imagenet_mae"]["init/skipped"] == ["patch_embed.proj.weight",
                                                            "pos_embed"]

    # the MAE student's fine-tuning started from pretrain_mae's output
    student = json.loads((run / "student_mae" / "manifest.json").read_text())
    init_manifest = json.loads((run / "pretrain_mae" / "manifest.json").read_text())
    assert student["upstream"]["pretrain_mae"] == init_manifest["fingerprint"]
    assert student["params"] == {"arm": "mae", "init_stage": "pretrain_mae"}
    assert 0.0 <= metrics["student_mae"]["val/dice"] <= 1.0


def test_mae_optimiser_groups_decay_weights_only_and_step_through_the_engine():
    """MAE's AdamW (betas 0.9/0.95, no decay on biases and norms) as engine groups: the engine
    takes the same steps as torch's AdamW over hand-made groups."""
    import copy

    from tskd.config import EngineConfig, MaeConfig, to_dict
    from tskd.models.students import build_student
    from tskd.stages.engine import build_engine
    from tskd.stages.pretrain import build_objective, param_groups

    p = to_dict(MaeConfig(decoder_dim=16, decoder_depth=1, decoder_heads=2))
    torch.manual_seed(0)
    student = build_student({"arch": "vit", "model_name": "vit_tiny_patch16_224",
                             "img_size": 32, "patch_size": 8, "decoder_dim": 16,
                             "pretrained": False}, 3)
    objective = build_objective("mae", student, p)
    reference = copy.deepcopy(objective)
    groups, betas = param_groups("mae", objective, p)
    assert betas == (0.9, 0.95)
    decay = {id(q): g["weight_decay"] for g in groups for q in g["params"]}
    for name, q in objective.named_parameters():
        assert decay[id(q)] == (0.0 if q.ndim <= 1 or name.endswith(".bias") else 0.05), name
    hand = torch.optim.AdamW(
        [{"params": [q for q in reference.parameters() if q.ndim > 1], "weight_decay": 0.05},
         {"params": [q for q in reference.parameters() if q.ndim <= 1], "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.95))
    engine = build_engine(objective, to_dict(EngineConfig()), lr=1e-3, weight_decay=0.05,
                          batch_size=2, steps_per_epoch=3, epochs=1,
                          device=torch.device("cpu"), param_groups=groups, betas=betas)
    for step in range(3):
        x = torch.rand(2, 3, 32, 32)
        torch.manual_seed(10 + step)  # the same random masks for both
        engine.step(engine(x).loss)
        torch.manual_seed(10 + step)
        hand.zero_grad()
        reference(x).loss.backward()
        hand.step()
    for (name, got), want in zip(objective.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=name)


def _pretrain_run(tmp_path, name: str, method: str, **extra):
    import ray.data

    from tskd.config import MaeConfig, MocoV3Config, RayConfig, StudentConfig, to_dict
    from tskd.stages.pretrain import _train_loop
    from tskd.stages.ray_train import fit_torch_trainer, load_result_state

    ray_cfg = RayConfig(num_workers=2, cpus_per_worker=0.5, torch_threads=1, checkpoint_every=1,
                        max_failures=1)
    p = (to_dict(MocoV3Config(epochs=3, batch_size=4, dim=8, mlp_dim=16)) if method == "mocov3"
         else to_dict(MaeConfig(epochs=3, batch_size=4, decoder_dim=16, decoder_depth=1,
                                decoder_heads=2)))
    config = {"method": method, "pretrain": p, "num_classes": 3, "n_transfer": 16, "seed": 0,
              "student": to_dict(StudentConfig(img_size=32, patch_size=8, decoder_dim=16)),
              "ray": to_dict(ray_cfg)} | extra
    g = torch.Generator().manual_seed(5)
    rows = [{"id": i, "image": (torch.rand(32, 32, 3, generator=g) * 255).numpy()}
            for i in range(16)]
    result = fit_torch_trainer(_train_loop, train_config=config, ray_cfg=ray_cfg, name=name,
                               storage=tmp_path / name,
                               datasets={"transfer": ray.data.from_items(rows,
                                                                         override_num_blocks=2)})
    return load_result_state(result)["student"], result.metrics


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mocov3", "mae"])
def test_pretraining_resumes_after_a_lost_worker(tmp_path, ray_local, method):
    """Rank 1 dies at the start of epoch 3: the workers restart from the last checkpoint (with
    MoCo v3's momentum encoder) and end with the uninterrupted run's student."""
    plain, _ = _pretrain_run(tmp_path, "plain", method)
    marker = tmp_path / "failed.marker"
    resumed, metrics = _pretrain_run(tmp_path, "lost", method,
                                     fail_once={"rank": 1, "epoch": 3, "marker": str(marker)})
    assert marker.exists() and metrics["pretrain/resumed_from_epoch"] in (1, 2)
    for key, value in plain.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6, msg=key)
