"""Checkpoints and lost workers: a 2-worker tiny distillation (DeepSpeed ZeRO-2, gloo) whose
rank 1 dies mid-run restarts from its last checkpoint and ends with the student of an
uninterrupted run; a run whose driver gave up resumes when started again on the same storage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tskd.config import DistillConfig, RayConfig, StudentConfig, to_dict

EPOCHS, N_IMAGES = 3, 8
TOL = dict(rtol=1e-5, atol=1e-6, equal_nan=True)
"""Resumed vs uninterrupted: the same engine state, RNG states and batches, so the students
agree to float rounding (different processes; reductions in the same order)."""


def _setup(tmp_path: Path, *, max_failures: int, fail_epoch: int | None,
           engine: dict | None = None, distill: dict | None = None):
    import ray.data

    from tskd.models.sam import build_sam

    base = tmp_path / "sam_tiny.pt"
    if not base.exists():
        torch.manual_seed(0)
        torch.save(build_sam("sam_tiny", num_classes=3, img_size=32).state_dict(), base)
    d = to_dict(DistillConfig(epochs=EPOCHS, batch_size=2, lr=1e-3, warmup_epochs=0.5))
    assert d["engine"]["kind"] == "auto" and d["engine"]["zero_stage"] == 2  # defaults
    d["engine"]["kind"] = "deepspeed"  # what auto runs on GPUs, here on CPU
    d["engine"].update(engine or {})
    d.update(distill or {})
    ray_cfg = RayConfig(num_workers=2, cpus_per_worker=0.5, torch_threads=1,
                        checkpoint_every=1, keep_checkpoints=2, max_failures=max_failures)
    config = {"teacher": {"tuned": False, "checkpoint": str(base), "arch": "sam_tiny",
                          "img_size": 32, "num_classes": 3},
              "student": to_dict(StudentConfig(img_size=32, decoder_dim=16)),
              "distill": d, "num_classes": 3, "n_transfer": N_IMAGES, "seed": 0,
              "ray": to_dict(ray_cfg)}
    if fail_epoch is not None:
        config["fail_once"] = {"rank": 1, "epoch": fail_epoch,
                               "marker": str(tmp_path / "failed.marker")}
    g = torch.Generator().manual_seed(5)
    rows = [{"id": i, "image": (torch.rand(32, 32, 3, generator=g) * 255).numpy()}
            for i in range(N_IMAGES)]
    return config, ray_cfg, ray.data.from_items(rows, override_num_blocks=2)


def _distil(tmp_path: Path, name: str, *, storage: Path, max_failures: int = 0,
            fail_epoch: int | None = None, engine: dict | None = None,
            distill: dict | None = None, metrics: dict | None = None
            ) -> tuple[dict[str, torch.Tensor], int | None]:
    """The distilled student and the epoch the run resumed from (None: it never resumed);
    the last report's metrics go into ``metrics`` when given."""
    from tskd.stages.distill import _train_loop
    from tskd.stages.ray_train import fit_torch_trainer, load_result_state

    config, ray_cfg, ds = _setup(tmp_path, max_failures=max_failures, fail_epoch=fail_epoch,
                                 engine=engine, distill=distill)
    result = fit_torch_trainer(_train_loop, train_config=config, ray_cfg=ray_cfg, name=name,
                               storage=storage, datasets={"transfer": ds})
    assert result.metrics["epoch"] == EPOCHS
    if metrics is not None:
        metrics.update(result.metrics)
    return (load_result_state(result)["student"],
            result.metrics.get("distill/resumed_from_epoch"))


@pytest.mark.slow
def test_lost_worker_restarts_from_last_checkpoint(tmp_path, ray_local):
    reference, never = _distil(tmp_path, "plain", storage=tmp_path / "ray_a")
    resumed, epoch = _distil(tmp_path, "lost_worker", storage=tmp_path / "ray_b",
                             max_failures=1, fail_epoch=3)
    assert never is None
    assert (tmp_path / "failed.marker").exists()  # rank 1 did die at epoch 3
    # the last checkpoint the controller had registered: epoch 2's, or epoch 1's when rank 1
    # died before epoch 2's report reached it (reports are asynchronous); never a fresh start
    assert epoch in (1, 2)
    for key, value in reference.items():
        torch.testing.assert_close(resumed[key], value, **TOL, msg=key)


@pytest.mark.slow
def test_rerun_on_the_same_storage_resumes(tmp_path, ray_local):
    """What a killed ``tskd run`` leaves: a run that stopped after epoch 1's checkpoint.
    Started again with the same name and storage (``ctx.train_dir``), it resumes."""
    reference, _ = _distil(tmp_path, "plain", storage=tmp_path / "ray_a")
    storage = tmp_path / "ray_b"
    # ray.max_failures=0, no retries: the lost worker fails the run at epoch 3, naming it
    with pytest.raises(RuntimeError, match="Ray Train run 'rerun' failed"):
        _distil(tmp_path, "rerun", storage=storage, fail_epoch=3)
    resumed, epoch = _distil(tmp_path, "rerun", storage=storage)
    assert epoch in (1, 2)
    for key, value in reference.items():
        torch.testing.assert_close(resumed[key], value, **TOL, msg=key)


@pytest.mark.slow
def test_zero3_two_workers_save_a_consolidated_student(tmp_path, ray_local):
    """ZeRO-3 partitions the student over the 2 workers; the stage's output is still the
    plain, whole state dict (gathered collectively), equal to plain DDP's student."""
    from tskd.models.students import build_student

    ddp, _ = _distil(tmp_path, "torch", storage=tmp_path / "ray_a", engine={"kind": "torch",
                                                                          "zero_stage": 0})
    zero3, _ = _distil(tmp_path, "zero3", storage=tmp_path / "ray_b", engine={"zero_stage": 3})
    plain = build_student(to_dict(StudentConfig(img_size=32, decoder_dim=16)), 3).state_dict()
    assert set(zero3) == set(plain)
    for key, value in plain.items():
        assert zero3[key].shape == value.shape, key
        torch.testing.assert_close(zero3[key], ddp[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_sharded_teacher_distils_the_replicated_student(tmp_path, ray_local):
    """The teacher partitioned over the 2 workers (ZeRO-3, every parameter sharded) trains the
    student the replicated teacher trains, while each worker holds half its parameters."""
    plain_m: dict = {}
    sharded_m: dict = {}
    plain, _ = _distil(tmp_path, "replicated", storage=tmp_path / "ray_a", metrics=plain_m)
    sharded, _ = _distil(tmp_path, "sharded", storage=tmp_path / "ray_b", metrics=sharded_m,
                         distill={"teacher_placement": "sharded", "shard_persist_below": 0})
    for key, value in plain.items():
        torch.testing.assert_close(sharded[key], value, **TOL, msg=key)
    ratio = sharded_m["perf/teacher_param_mb"] / plain_m["perf/teacher_param_mb"]
    assert 0.5 <= ratio < 0.501  # ceil(numel / 2) per tensor
    assert sharded_m["perf/teacher_param_peak_mb"] < plain_m["perf/teacher_param_peak_mb"]
