"""The whole pipeline on a tiny config under a real local Ray, with 2 training workers (gloo)."""

import json
from pathlib import Path

import pytest
from monai.networks.nets import BasicUNet
from tiny_pipeline import tiny_overrides

from tskd.config import fingerprint, load_config, to_dict
from tskd.pipeline import run_pipeline

TINY = tiny_overrides(n_images=40, num_workers=2, extra=(
    "reference.epochs=1", "reference.batch_size=4",
    # a teacher trained for one epoch is not expected to beat the quality floor: record, go on
    "check.baseline_epochs=1", "check.on_fail=continue"))


def _fresh_run(root: Path) -> tuple:
    """The tiny pipeline from nothing (own output dir, own teacher cache): config, metrics."""
    cfg = load_config(None, TINY + [f"output_dir={root}",
                                    f"teacher.pretrain.cache_dir={root / 'cache'}"])
    return cfg, run_pipeline(cfg)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, ray_local):
    """One fresh tiny run (~7 min on 2 cores), shared by the end-to-end and reproducibility
    tests: the second compares it with a run of its own."""
    root = tmp_path_factory.mktemp("first")
    cfg, metrics = _fresh_run(root)
    return root, cfg, metrics


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(first_run):
    tmp_path, cfg, metrics = first_run
    results = json.loads((cfg.run_dir / "results.json").read_text())
    assert results["experiment"] == "tiny"
    assert results["dataset"] == "tskd-demo-ultrasound"
    assert set(results["students"]) == {"ts_kd", "ta_kd", "scratch"}
    # the label-only reference (MONAI BasicUNet) is scored beside the students
    assert results["reference"]["arch"] == "basic_unet"
    for entry in [results["reference"], *results["students"].values()]:
        assert entry["model"]["params"] > 0 and entry["model"]["latency_ms"] > 0
        assert entry["model"]["size_mb"] >= entry["model"]["params"] * 4 / 1e6  # float32
    assert results["students"]["scratch"]["arch"] == "vit"
    unet = BasicUNet(spatial_dims=2, in_channels=3, out_channels=3)  # MONAI's, built directly
    assert results["reference"]["model"]["params"] == sum(p.numel() for p in unet.parameters())
    for scores in [results["teacher"], *results["students"].values(), results["reference"]]:
        assert set(scores) >= {"dice", "hd95", "miou", "per_class"}
        assert 0.0 <= scores["dice"] <= 1.0 and 0.0 <= scores["miou"] <= 1.0
        assert set(scores["per_class"]) == {"organ", "lesion"}
    # what the scores mean and where they come from
    assert results["metrics"]["convention"] == "tskd"
    assert results["metrics"]["miou_includes_background"] is False
    splits = json.loads((cfg.run_dir / "data" / "splits.json").read_text())
    root = Path(splits["root"])  # the demo dataset lives in the data stage's store entry
    root = root if root.is_absolute() else (cfg.run_dir / "data").resolve() / root
    declared = json.loads((root / "dataset.json").read_text())
    assert results["metrics"]["hd95_unit"] == ("mm" if declared.get("spacing") else "pixels")
    seen = {"train": len(splits["labelled"]), "val": len(splits["val"]),
            "total": len(splits["labelled"]) + len(splits["val"])}
    assert seen["train"] > 0 and seen["val"] > 0
    assert results["labelled_images"] == {"teacher": seen, "reference": seen,
                                          "students": {a: seen for a in results["students"]}}
    assert results["seed"] == cfg.seed
    assert results["config_fingerprint"] == fingerprint(to_dict(cfg))
    manifests = {p.parent.name: json.loads(p.read_text())
                 for p in cfg.run_dir.glob("*/manifest.json")}
    assert results["stage_fingerprints"] == {name: m["fingerprint"] for name, m in
                                             sorted(manifests.items()) if name != "evaluate"}
    # artifacts of every stage
    for stage in ["data", "teacher_pretrain", "teacher", "ddpm", "transfer", "distill_ts_kd",
                  "distill_ta_kd", "student_ts_kd", "student_ta_kd", "student_scratch",
                  "reference", "evaluate"]:
        manifest = json.loads((cfg.run_dir / stage / "manifest.json").read_text())
        assert manifest["status"] == "complete", stage
    # the adapter file holds what was trained (encoder adapters + the decoder, trained in full
    # by default): smaller than the whole teacher, and its size is the reported metric
    lora_mb = (cfg.run_dir / "teacher" / "lora.pt").stat().st_size / 2**20
    base_mb = sum(p.stat().st_size for p in (tmp_path / "cache" / "teachers").glob("*/sam.pth")) / 2**20
    assert lora_mb < base_mb
    assert metrics["teacher"]["teacher/adapter_mb"] == pytest.approx(lora_mb, abs=1e-3)
    assert metrics["transfer"]["transfer/n_images"] == 8
    assert list((tmp_path / "cache" / "teachers").glob("*/sam.pth"))

    # a second run skips everything and gives the same results
    again = run_pipeline(cfg)
    assert again["evaluate"] == metrics["evaluate"]


@pytest.mark.slow
def test_tiny_pipeline_is_reproducible(first_run, tmp_path):
    """Two fresh runs (own output dirs, own teacher caches) with the same seed give the same
    results.json scores, and the same distillation losses (the stage whose data order used to
    depend on Ray Data's scheduling)."""
    runs = [first_run[1:], _fresh_run(tmp_path)]
    runs = [(metrics, json.loads((cfg.run_dir / "results.json").read_text()))
            for cfg, metrics in runs]
    (m_a, r_a), (m_b, r_b) = runs

    def results(r):  # scores and settings; measured times (latency, pretraining cost) are not
        out = {k: r[k] for k in ("teacher", "labelled_images", "metrics", "seed")}
        for group, entries in (("students", r["students"]), ("reference", {"": r["reference"]})):
            out[group] = {a: {k: v for k, v in e.items() if k != "model"} for a, e in entries.items()}
            for e in out[group].values():
                if e.get("pretrain"):  # which stage pretrained it is a result; its wall time is not
                    e["pretrain"] = e["pretrain"]["stage"]
        return out

    assert results(r_a) == results(r_b)
    for stage in ("distill_ts_kd", "distill_ta_kd", "student_ts_kd", "student_scratch",
                  "reference"):
        def scores(m):  # measured speeds (perf/*: throughput, data stall; latency) vary
            return {k: v for k, v in m.items()
                    if not k.startswith("perf/") and k not in ("student/latency_ms",)
                    and not k.endswith("time_s")}
        assert scores(m_a[stage]) == scores(m_b[stage]), stage
        assert "distill/loss" in scores(m_a[stage]) or not stage.startswith("distill"), stage


@pytest.mark.slow
def test_tiny_pipeline_on_patches(tmp_path, ray_local):
    """The tiny pipeline on 64-px images with 32-px patches: every stage trains on crops (the
    transfer set holds 32-px patches) and evaluate scores full-resolution predictions."""
    from tskd.data.fingerprint import resolve_image_size
    from tskd.pipeline import plan

    overrides = [o for o in TINY if not o.startswith(("data.demo.size", "data.image_size"))]
    cfg = load_config(None, overrides + [
        "data.demo.size=64", "data.image_size=64", "data.patch_size=32",
        "students=[ts_kd, scratch]", f"output_dir={tmp_path}",
        f"teacher.pretrain.cache_dir={tmp_path / 'cache'}"])
    assert resolve_image_size(cfg).data.patches
    data_slice = plan(cfg)[0].config["data"]
    assert data_slice["patch_size"] == 32 and data_slice["image_size"] == 64
    metrics = run_pipeline(cfg)
    assert metrics["data"]["data/patch_size"] == 32
    transfer = json.loads((cfg.run_dir / "transfer" / "transfer.json").read_text())
    assert transfer["image_size"] == 32
    results = json.loads((cfg.run_dir / "results.json").read_text())
    for scores in [results["teacher"], *results["students"].values(), results["reference"]]:
        assert 0.0 <= scores["dice"] <= 1.0 and scores["n_images"] == results["n_test"]
    ref = json.loads((cfg.run_dir / "reference" / "manifest.json").read_text())
    assert ref["stage_config"]["patch_size"] == 32  # the reference trains at the patch size
