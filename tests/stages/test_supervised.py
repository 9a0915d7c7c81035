"""fit_supervised with and without model selection (no Ray: report is captured)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import tskd.stages.supervised as supervised


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.conv(x / 255.0))


def _items(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        mask = np.zeros((16, 16), np.int64)
        mask[4:12, 3:10] = 1
        image = rng.uniform(0, 60, (3, 16, 16)).astype(np.float32)
        image[:, mask == 1] += 150
        out.append({"image": torch.from_numpy(image), "mask": torch.from_numpy(mask),
                    "id": f"c{i}"})
    return out


def _fit(monkeypatch, val_set, epochs=4, every=1):
    """Run the loop with Ray's report/checkpoint captured: ``calls`` = (metrics, output or
    None) per epoch, the output being what that epoch's checkpoint carries."""
    from tskd.config import EngineConfig, to_dict
    from tskd.stages.engine import build_engine

    calls: list[tuple[dict, dict | None]] = []
    monkeypatch.setattr(supervised, "report", lambda m: calls.append((m, None)))
    monkeypatch.setattr(supervised, "checkpoint",
                        lambda m, *, engine, epoch, loop, output: calls.append((m, output)))
    monkeypatch.setattr(supervised, "resume", lambda engine, tag: (1, {}, None))
    monkeypatch.setattr(supervised, "is_rank_zero", lambda: True)
    torch.manual_seed(0)
    model = _Tiny()
    engine = build_engine(model, to_dict(EngineConfig()), lr=0.05, weight_decay=0.0,
                          batch_size=3, steps_per_epoch=2, epochs=epochs,
                          device=torch.device("cpu"))
    info = SimpleNamespace(num_classes=2, class_names=["background", "fg"])
    supervised.fit_supervised(engine, DataLoader(_items(6, 0), batch_size=3), val_set,
                              info=info, epochs=epochs, device=torch.device("cpu"), seed=0,
                              checkpoint_every=every,
                              state_fn=lambda m: {"w": {k: v.clone()
                                                        for k, v in m.state_dict().items()}},
                              tag="t")
    return model, calls


def test_no_validation_keeps_the_last_epoch(monkeypatch) -> None:
    for val_set in (None, []):
        model, calls = _fit(monkeypatch, val_set, every=3)
        assert [m["epoch"] for m, _ in calls] == [1, 2, 3, 4]
        assert all("val/dice" not in m for m, _ in calls)
        states = [s for _, s in calls if s is not None]
        assert len(states) == 1 and calls[-1][1] is states[0]
        state = states[0]
        assert state["epoch"] == 4 and state["selection"] == "last_epoch"
        assert state["val/dice"] is None
        for k, v in model.state_dict().items():  # the final weights, not an earlier epoch's
            assert torch.equal(state["w"][k], v)


def test_validation_keeps_the_best_epoch(monkeypatch) -> None:
    _, calls = _fit(monkeypatch, _items(3, 1), epochs=5)
    dice = [m["val/dice"] for m, _ in calls]
    running = np.maximum.accumulate(dice)
    assert [m["val/best_dice"] for m, _ in calls] == list(running)
    improved = [e for e, d, prev in zip(range(1, 6), dice, [-1.0, *running[:-1]]) if d > prev]
    assert len(improved) >= 2  # the test sees the output move
    for epoch, (_, output) in enumerate(calls, 1):  # each checkpoint: the best so far
        best_epoch = max(e for e in improved if e <= epoch)
        assert output["epoch"] == best_epoch and output["selection"] == "best_val"
        assert output["val/dice"] == dice[best_epoch - 1]


@pytest.mark.slow
def test_student_stage_without_model_selection_keeps_the_last_epoch(tmp_path, ray_local):
    """Through Ray Train: data.model_selection=false gives no validation images, the whole budget
    trains, and the stage keeps (and reports) the last epoch."""
    import json

    from tskd.artifacts import StageContext
    from tskd.config import load_config
    from tskd.stages import data_stage, student_finetune

    cfg = load_config(None, [
        f"output_dir={tmp_path}", "data.demo.n_images=20", "data.demo.size=32",
        "data.image_size=32", "data.n_labels=8", "data.model_selection=false",
        "student.img_size=32", "student.patch_size=8", "student.decoder_dim=16",
        "student_finetune.epochs=2", "student_finetune.batch_size=4",
        "ray.cpus_per_worker=0.5", "ray.torch_threads=1"])
    data_dir, out = tmp_path / "data", tmp_path / "student_scratch"
    data_dir.mkdir()
    out.mkdir()
    metrics = data_stage.run(StageContext("data", data_dir, {}, cfg))
    assert metrics["data/n_labelled_train"] == 8 and metrics["data/n_labelled_val"] == 0
    saved = json.loads((data_dir / "splits.json").read_text())
    assert saved["val"] == [] and saved["model_selection"] is False
    result = student_finetune.run(StageContext("student_scratch", out, {"data": data_dir}, cfg,
                                               params={"arm": "scratch"}))
    assert result["student/best_epoch"] == 2 and result["val/dice"] is None
    assert (out / student_finetune.STUDENT_FILE).is_file()
