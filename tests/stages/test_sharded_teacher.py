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


def _whole(teacher: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """The whole teacher's outputs on every rank's images, and its parameter bytes: all of them,
    a rank's share under ZeRO-3 with nothing kept whole (ceil(numel / 2) elements of every
    tensor), and the largest sub-module's own parameters (what one gather holds)."""
    with torch.no_grad():
        logits, hidden = teacher(_images())
    params = list(teacher.parameters())
    full = sum(p.numel() * p.element_size() for p in params)
    half = sum(-(-p.numel() // WORLD) * p.element_size() for p in params)
    largest = max(sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
                  for m in teacher.modules())
    return logits, hidden, full, half, largest


def _rank_result(path: Path, rank: int, logits: torch.Tensor, hidden: torch.Tensor) -> dict:
    """What a rank saved, after checking its outputs against the whole teacher's on its rows
    (the same float ops on the same weights, gathered: equal up to float rounding)."""
    got = torch.load(path)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    torch.testing.assert_close(got["logits"], logits[rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["hidden"], hidden[rows], rtol=1e-5, atol=1e-5)
    return got


@pytest.mark.parametrize("features", ["neck", "blocks"])
def test_sharded_teacher_equals_the_whole_teacher_with_half_the_parameters(tmp_path, features):
    mp.spawn(_rank, args=(_free_port(), str(tmp_path), features, 0), nprocs=WORLD)
    whole = _teacher(features)
    want_logits, want_hidden, full, half, largest = _whole(whole)
    for rank in range(WORLD):
        got = _rank_result(tmp_path / f"rank{rank}.pt", rank, want_logits, want_hidden)
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


def _teacher_stage(root: Path, decoder: str) -> Path:
    """A ``teacher`` stage's outputs as the stage writes them (``teacher.json``, ``lora.pt``)
    over a base checkpoint made at another input size and class count, so loading resizes
    positions and adapts class rows; the adapters are perturbed away from their zero init."""
    import json
    from dataclasses import asdict

    from tskd.lora import LoraSpec, apply_lora, lora_state_dict
    from tskd.models.sam import SamSegmenter, build_sam

    torch.manual_seed(3)
    base = root / "base.pth"
    torch.save(build_sam("sam_tiny", num_classes=2, img_size=64).state_dict(), base)
    spec = LoraSpec(rank=2, alpha=4.0, decoder=decoder)
    seg = apply_lora(SamSegmenter(build_sam("sam_tiny", num_classes=CLASSES, img_size=SIZE,
                                            checkpoint=base)), spec)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in seg.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    stage = root / "teacher"
    stage.mkdir()
    torch.save(lora_state_dict(seg), stage / "lora.pt")
    (stage / "teacher.json").write_text(json.dumps({
        "arch": "sam_tiny", "num_classes": CLASSES, "img_size": SIZE,
        "base_checkpoint": str(base), "lora": asdict(spec), "best_epoch": 0}))
    return stage


def _distill_config(stage: Path) -> dict:
    return {"teacher": {"tuned": True, "stage_dir": str(stage)},
            "distill": {"w_logits": 0.2, "teacher_features": "neck", "batch_size": BATCH,
                        "teacher_placement": "sharded", "shard_persist_below": 0,
                        "shard_prefetch": 0}}


def _rank_built(rank: int, port: int, out: str, stage: str) -> None:
    """One rank of the production path: ``place_teacher`` with the sharded placement, which
    builds the teacher partitioned and fills it from the stage's files. Records what this rank
    held before the weights were written and the most it held while writing them."""
    import torch.distributed as dist

    import tskd.stages.engine as engine
    from tskd.stages.distill import place_teacher

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    seen: dict = {"loading": []}
    load, linear = engine.load_partitioned, torch.nn.functional.linear

    def spy(module, plan):
        seen["built"] = engine.held_param_bytes(module)

        def sampled(fn):
            def value(current):
                seen["loading"].append(engine.held_param_bytes(module))
                return fn(current)
            return value
        load(module, {k: sampled(fn) for k, fn in plan.items()})

    engine.load_partitioned = spy
    try:
        teacher = place_teacher(_distill_config(Path(stage)), torch.device("cpu"))
        images = _images()[rank * BATCH:(rank + 1) * BATCH]
        logits, hidden = teacher(images)
        torch.save({"logits": logits, "hidden": hidden, "held": engine.held_param_bytes(
            teacher.module), "torch_linear_kept": torch.nn.functional.linear is linear, **seen},
            Path(out) / f"built{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_teacher_is_built_partitioned_and_never_whole(tmp_path):
    """The sharded placement never materialises the whole teacher on a worker: it is built
    under ``deepspeed.zero.Init`` (each rank holds half of every weight before any is loaded)
    and filled one sub-module at a time (at most that sub-module whole), and still gives the
    outputs of the whole merged teacher that the replicated placement loads."""
    from tskd.stages.distill import TeacherTargets
    from tskd.stages.teacher_finetune import load_finetuned_teacher

    stage = _teacher_stage(tmp_path, "full")  # the other decoder modes: test_lora.py's plan test
    mp.spawn(_rank_built, args=(_free_port(), str(tmp_path), str(stage)), nprocs=WORLD)
    whole = TeacherTargets(load_finetuned_teacher(stage), need_logits=True).eval()
    want_logits, want_hidden, full, half, largest = _whole(whole)
    for rank in range(WORLD):
        got = _rank_result(tmp_path / f"built{rank}.pt", rank, want_logits, want_hidden)
        assert got["built"] == half and got["held"] == half
        assert got["torch_linear_kept"]  # zero.Init did not swap the process's F.linear
        buffers = len(whole.state_dict()) - len(list(whole.parameters()))  # every rank writes
        assert buffers == 1  # the prompt encoder's positional Gaussian matrix
        if rank == 0:  # rank 0 writes the weights, inside each sub-module's gather
            assert len(got["loading"]) == len(whole.state_dict())
            assert half < max(got["loading"]) <= half + largest < full
        else:
            assert got["loading"] == [half] * buffers


def test_teacher_weight_plan_gives_both_loaders_weights(tmp_path):
    """What the sharded placement is filled from: the tuned teacher's plan gives the weights
    of ``load_finetuned_teacher``, the foundation SAM's plan (task-agnostic KD) those of
    ``load_base_teacher``, key by key."""
    import json

    from tskd.models.sam import SamSegmenter, build_sam
    from tskd.stages.teacher_finetune import (load_base_teacher, load_finetuned_teacher,
                                              plan_teacher_weights, teacher_spec)

    stage = _teacher_stage(tmp_path, "lora")
    spec = teacher_spec({"tuned": True, "stage_dir": str(stage)})
    base = {"tuned": False, "arch": "sam_tiny", "num_classes": CLASSES, "img_size": SIZE,
            "checkpoint": spec["base_checkpoint"]}
    assert spec == json.loads((stage / "teacher.json").read_text())
    def seeded(load):  # the same fresh rows for the classes the checkpoint lacks
        torch.manual_seed(0)
        return load()

    for want, stage_dir, t in (
            (seeded(lambda: load_finetuned_teacher(stage)), stage, spec),
            (seeded(lambda: load_base_teacher(tmp_path / "base.pth", arch="sam_tiny",
                                              num_classes=CLASSES, img_size=SIZE)), None,
             teacher_spec(base))):
        torch.manual_seed(0)
        skeleton = SamSegmenter(build_sam(t["arch"], num_classes=t["num_classes"],
                                          img_size=t["img_size"]))
        plan = plan_teacher_weights(t, skeleton, stage_dir=stage_dir)
        current = skeleton.state_dict()
        assert set(plan) == set(current)
        for key, value in want.state_dict().items():
            assert torch.equal(plan[key](current[key]), value), key
