"""The data stage writes the vessel demo and records the dataset fingerprint and plan."""

from __future__ import annotations

import json

from tskd.artifacts import StageContext
from tskd.config import load_config
from tskd.data.fingerprint import resolve_image_size
from tskd.stages import data_stage


def test_data_stage_records_fingerprint_and_warnings(tmp_path):
    cfg = resolve_image_size(load_config(None, [
        "data.demo.kind=vessels", "data.demo.n_images=20", "data.demo.size=128",
        "data.image_size=64", "data.n_labels=6", f"output_dir={tmp_path}"]))
    ctx = StageContext("data", tmp_path / "data", {}, cfg)
    ctx.dir.mkdir()
    metrics = data_stage.run(ctx)
    record = json.loads((ctx.dir / data_stage.FINGERPRINT_FILE).read_text())
    assert record["fingerprint"]["n_measured"] == 6  # the label budget's masks only
    assert record["fingerprint"]["native_size"] == 128
    assert record["plan"]["image_size"] == 128  # vessels ~2 px wide: no shrinking
    assert metrics["data/image_size"] == 64
    assert metrics["data/size_warnings"] == record["size_warnings"]
    assert any("'vessel'" in w and "data.image_size=64" in w for w in metrics["data/size_warnings"])
