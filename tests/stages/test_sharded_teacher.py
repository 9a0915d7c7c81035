"""The ``sharded`` teacher placement: the frozen teacher partitioned over 2 gloo ranks with
ZeRO-3 (:class:`tskd.stages.engine.ShardedModule`) gives the whole teacher's outputs, while each
rank holds about half of its parameters (two processes, no Ray; the Ray Train run is in
``test_checkpoints.py``)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

WORLD, BATCH, SIZE, CLASSES = 2, 3, 32, 5


def _teacher(features: str) -> torch.nn.Module:
    """A 5-class tiny SAM as TeacherTargets (the decoder's token embeddings are read directly
    by ``decode``: the external parameters ZeRO-3 must gather too)."""
    from tskd.models.sam import SamSegmenter, build_sam
    from tskd.stages.distill import TeacherTargets

    torch.manual_seed(0)  # every rank builds the same weights
    sam = build_sam("sam_tiny", num_classes=CLASSES, img_size=SIZE)
    return TeacherTargets(SamSegmenter(sam), need_logits=True, features=features).eval()


def _images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(WORLD * BATCH, 3, SIZE, SIZE, generator=g) * 255


def _rank(rank: int, port: int, out: str, features: str, persist_below: int) -> None:
    """One rank: shard the teacher, run it on this rank's share of the images, save what it
    saw (outputs, held bytes before and at the peak of the forward)."""
    import torch.distributed as dist

    from tskd.stages.engine import ShardedModule, held_param_bytes, peak_param_bytes

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    linear = torch.nn.functional.linear
    try:
        teacher = ShardedModule(_teacher(features), batch_size=BATCH,
                                device=torch.device("cpu"), persist_below=persist_below)
        held = held_param_bytes(teacher.module)
        images = _images()[rank * BATCH:(rank + 1) * BATCH]
        with peak_param_bytes(teacher.module) as peak:
            logits, hidden = teacher(images)
        torch.save({"logits": logits, "hidden": hidden, "held": held, "peak": peak[0],
                    "hidden_dim": teacher.hidden_dim,
                    "after": held_param_bytes(teacher.module),
                    "torch_linear_kept": torch.nn.functional.linear is linear},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("features", ["neck", "blocks"])
def test_sharded_teacher_equals_the_whole_teacher_with_half_the_parameters(tmp_path, features):
    mp.spawn(_rank, args=(_free_port(), str(tmp_path), features, 0), nprocs=WORLD)
    whole = _teacher(features)
    with torch.no_grad():
        want_logits, want_hidden = whole(_images())
    params = list(whole.parameters())
    full = sum(p.numel() * p.element_size() for p in params)
    # ZeRO-3 with nothing kept whole: each rank keeps ceil(numel / 2) elements of every tensor
    half = sum(-(-p.numel() // WORLD) * p.element_size() for p in params)
    largest = max(sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
                  for m in whole.modules())
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        # the same float ops on the same weights, gathered: equal up to float rounding
        torch.testing.assert_close(got["logits"], want_logits[rows], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["hidden"], want_hidden[rows], rtol=1e-5, atol=1e-5)
        assert got["hidden_dim"] == whole.hidden_dim
        assert got["torch_linear_kept"]  # ZeRO-3 did not swap the process's F.linear
        assert got["held"] == half and got["after"] == half  # released after the forward
        # inside the forward: its shard plus the layers gathered at that moment, never all
        assert half + largest <= got["peak"] < full
    assert got["peak"] / full < 0.75


def test_sharded_placement_is_a_config_choice():
    from tskd.config import ConfigError, load_config

    cfg = load_config(None, ["distill.teacher_placement=sharded", "distill.shard_prefetch=1000"])
    assert cfg.distill.teacher_placement == "sharded" and cfg.distill.shard_prefetch == 1000
    with pytest.raises(ConfigError, match="distill.shard_persist_below"):
        load_config(None, ["distill.shard_persist_below=-1"])
    with pytest.raises(ConfigError, match="teacher_placement"):
        load_config(None, ["distill.teacher_placement=everywhere"])


def test_the_plan_runs_a_sharded_teacher_live_and_fingerprints_its_settings():
    """No targets stage; the shard settings reach the distillation stage (and its fingerprint)
    only when the teacher is sharded, so the other placements' entries stay as they were."""
    from tskd.config import load_config
    from tskd.pipeline import plan

    sharded = {s.name: s for s in plan(load_config(None, ["distill.teacher_placement=sharded"]))}
    assert not any(n.startswith("targets_") for n in sharded)
    assert sharded["distill_ts_kd"].deps == ("data", "teacher", "transfer")
    kd = sharded["distill_ts_kd"].config["distill"]
    assert (kd["teacher_placement"], kd["shard_persist_below"], kd["shard_prefetch"]) == \
        ("sharded", 100_000, 0)
    replicated = {s.name: s for s in plan(load_config(None,
                                                      ["distill.teacher_placement=replicated"]))}
    assert "shard_prefetch" not in replicated["distill_ts_kd"].config["distill"]
