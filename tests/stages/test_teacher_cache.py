"""The cached teacher placement: targets equal the live teacher's on the same view; the cache
is checked against the run; the placement is chosen by size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tskd.config import load_config
from tskd.stages.distill import CachedTargets, TeacherTargets, flip_per_sample
from tskd.stages.teacher_cache import (CACHE_FILE, TeacherCacheError, _TeacherActor,
                                       check_cache, placement)


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    from tskd.models.sam import build_sam

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save(build_sam("sam_tiny", num_classes=3, img_size=32).state_dict(), path)
    return path


def _actor(checkpoint: Path, need_logits: bool) -> _TeacherActor:
    teacher = {"tuned": False, "checkpoint": str(checkpoint), "arch": "sam_tiny",
               "img_size": 32, "num_classes": 3}
    distill = {"w_logits": 0.2 if need_logits else 0.0, "teacher_features": "neck"}
    return _TeacherActor({"teacher": teacher, "distill": distill}, threads=1, use_gpu=False)


def test_cached_targets_equal_the_live_teacher_on_the_same_view(base_checkpoint):
    actor = _actor(base_checkpoint, need_logits=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)  # transfer images, HWC
    cache = actor({"id": np.arange(4), "image": images})
    assert cache["logits0"].dtype == np.float16 and cache["hidden1"].dtype == np.float16
    assert cache["logits0"].shape == (4, 3, 8, 8) and cache["hidden0"].shape == (4, 256, 2, 2)
    # the live teacher of the replicated placement, on the images the loop would draw
    live = actor.teacher
    batch = {k: torch.from_numpy(v).float() for k, v in cache.items() if k != "id"}
    torch.manual_seed(7)
    got_images, (got_logits, got_hidden) = CachedTargets(
        {k: list(v.shape[1:]) for k, v in cache.items() if k[:1] in "lh"})(batch)
    torch.manual_seed(7)
    drawn = flip_per_sample(torch.from_numpy(images).permute(0, 3, 1, 2).float())
    assert torch.equal(got_images, drawn)
    with torch.no_grad():
        want_logits, want_hidden = live(drawn)
    torch.testing.assert_close(got_logits, want_logits, rtol=2e-3, atol=2e-3)  # fp16
    torch.testing.assert_close(got_hidden, want_hidden, rtol=2e-3, atol=2e-3)


def test_task_agnostic_cache_holds_hidden_states_only(base_checkpoint):
    actor = _actor(base_checkpoint, need_logits=False)
    assert isinstance(actor.teacher, TeacherTargets) and not actor.teacher.need_logits
    cache = actor({"id": np.arange(2), "image": np.zeros((2, 32, 32, 3), np.uint8)})
    assert set(cache) == {"id", "image", "hidden0", "hidden1"}


def test_a_cache_of_another_run_is_refused(tmp_path):
    expected = {"arm": "ts_kd", "teacher_entry": "aaa", "transfer_entry": "bbb",
                "features": "neck", "logits": True}
    (tmp_path / CACHE_FILE).write_text(json.dumps(expected | {"shapes": {}}))
    assert check_cache(tmp_path, expected)["arm"] == "ts_kd"
    with pytest.raises(TeacherCacheError) as err:
        check_cache(tmp_path, expected | {"teacher_entry": "ccc", "features": "blocks"})
    msg = str(err.value)
    assert "teacher_entry is 'aaa', expected 'ccc'" in msg
    assert "features is 'neck', expected 'blocks'" in msg
    with pytest.raises(TeacherCacheError, match="not a teacher-target cache"):
        check_cache(tmp_path / "missing", expected)


def test_auto_placement_caches_when_it_fits():
    assert placement(load_config(None), 3) == "cached"  # the demo: a few MB
    assert placement(load_config(None, ["distill.cache_max_gb=0.001"]), 3) == "replicated"
    assert placement(load_config(None, ["distill.teacher_placement=replicated"]), 3) == \
        "replicated"
    # 300 images, 2 views, fp16: 3 x 32 x 32 logits + 256 x 8 x 8 neck states each
    per_image = 2 * 2 * (3 * 32 * 32 + 256 * 8 * 8)
    limit = 300 * per_image / 2**30
    assert placement(load_config(None, [f"distill.cache_max_gb={limit}"]), 3) == "cached"
    assert placement(load_config(None, [f"distill.cache_max_gb={limit * 0.99}"]), 3) == \
        "replicated"


def test_the_plan_puts_a_targets_stage_before_each_distillation():
    from tskd.pipeline import plan

    stages = {s.name: s for s in plan(load_config(None))}
    assert stages["targets_ts_kd"].deps == ("data", "teacher", "transfer")
    assert stages["distill_ts_kd"].deps[-1] == "targets_ts_kd"
    assert stages["targets_ta_kd"].deps == ("data", "teacher_pretrain", "transfer")
    replicated = {s.name for s in plan(load_config(None, ["distill.teacher_placement=replicated"]))}
    assert not any(n.startswith("targets_") for n in replicated)


def test_row_shapes_are_read_from_the_shards(tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    from tskd.stages.teacher_cache import _row_shapes

    hidden = np.zeros((3, 2, 8, 4, 4), np.float16)  # 3 images x (views, C, h, w)
    logits = np.zeros((3, 2, 5, 16, 16), np.float16)
    table = pa.table({"id": np.arange(3), "hidden": ArrowTensorArray.from_numpy(hidden),
                      "logits": ArrowTensorArray.from_numpy(logits)})
    (tmp_path / "t").mkdir()
    pq.write_table(table.slice(0, 0), tmp_path / "t" / "0-empty.parquet")
    pq.write_table(table, tmp_path / "t" / "1.parquet")
    assert _row_shapes(tmp_path / "t") == {"hidden": [2, 8, 4, 4], "logits": [2, 5, 16, 16]}
    assert _row_shapes(tmp_path / "none") == {}
