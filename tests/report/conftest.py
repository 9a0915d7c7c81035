"""Fixtures of the report tests: fake runs (see fake_runs.py), tiny saved models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fake_runs import ARMS, IMAGE_SIZE, REFERENCE_CFG, STUDENT_CFG, FakeGrid


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """student.pt files: a test_vit student per arm (random, head sharpened so labels vary)
    and a basic_unet reference."""
    import torch

    from tskd.models.students import build_student
    from tskd.report.images import model_config
    from tskd.report.collect import Row

    out = tmp_path_factory.mktemp("models")
    paths = {}
    for k, arm in enumerate(ARMS):
        torch.manual_seed(k)
        model = build_student(STUDENT_CFG, 3)
        with torch.no_grad():
            model.decoder.head[-1].weight.mul_(20)
        paths[arm] = out / f"{arm}.pt"
        torch.save(model.state_dict(), paths[arm])
    ref_dir = out / "ref"
    ref_dir.mkdir()
    (ref_dir / "manifest.json").write_text(json.dumps(
        {"stage_config": {"reference": REFERENCE_CFG, "image_size": IMAGE_SIZE}}))
    torch.manual_seed(9)
    ref = build_student(model_config(Row("r", "reference", "reference", stage_dir=ref_dir)), 3)
    paths["reference"] = out / "reference.pt"
    torch.save(ref.state_dict(), paths["reference"])
    return paths


@pytest.fixture(scope="session")
def fake_dataset(tmp_path_factory) -> Path:
    from tskd.data.demo import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("ds") / "dataset", n_images=8,
                              size=IMAGE_SIZE, seed=1)


@pytest.fixture(scope="session")
def single_run(tmp_path_factory, fake_dataset, tiny_models) -> Path:
    """One `tskd run`: runs/demo with a reference and trained students."""
    root = tmp_path_factory.mktemp("single") / "runs"
    return FakeGrid(root, fake_dataset).run("demo", labels=40, size=300, seed=0,
                                            students=tiny_models)


@pytest.fixture(scope="session")
def grid_root(tmp_path_factory, fake_dataset, tiny_models) -> Path:
    """A grid: label budgets 40/80 x transfer sizes 100/200 x seeds 0/1/2, students saved in
    the showcase cell (80 labels, 200 images, seed 0), plus one cell whose transfer stage
    failed and one seed-3 cell run without the reference."""
    root = tmp_path_factory.mktemp("grid") / "runs"
    grid = FakeGrid(root, fake_dataset)
    for labels in (40, 80):
        for size in (100, 200):
            for seed in (0, 1, 2):
                show = labels == 80 and size == 200 and seed == 0
                grid.run(f"l{labels}_t{size}_s{seed}", labels=labels, size=size, seed=seed,
                         students=tiny_models if show else None)
    grid.run("l40_t300_s0", labels=40, size=300, seed=0, fail_stage="transfer")
    grid.run("l20_t100_s3", labels=20, size=100, seed=3, reference=False)
    grid.run("l80_t400_s0", labels=80, size=400, seed=0, stop_at="transfer")  # still running
    return root


@pytest.fixture(scope="session")
def single_report(single_run, tmp_path_factory) -> Path:
    from tskd.report import write_report

    return write_report(single_run, tmp_path_factory.mktemp("out") / "single.html")


@pytest.fixture(scope="session")
def grid_report(grid_root, tmp_path_factory) -> Path:
    from tskd.report import write_report

    return write_report(grid_root, tmp_path_factory.mktemp("out") / "grid.html", n_images=2)
