"""tskd.convert.kidneyus on tiny fixtures in the Open Kidney Ultrasound layout.

Two annotation forms of the official repository: the VIA CSV export
``labels/reviewed_labels_<r>.csv`` and its rasterisation ``labels/reviewed_masks_<r>/{capsule,
regions}/*.png`` (capsule 0/1; regions 1 central echo complex, 2 medulla, 3 cortex)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tskd.convert import convert
from tskd.data.format import DatasetError, load_dataset_info, read_case

H, W = 24, 32
NAMES = ["1_IM-0001-0059_anon.png", "2_IM-0383-0001_anon.png"]


def _rect(x0, y0, x1, y1):
    """VIA polygon of an axis-aligned rectangle (corners inclusive)."""
    return {"name": "polygon", "all_points_x": [x0, x1, x1, x0], "all_points_y": [y0, y0, y1, y1]}


# (anatomy, rectangle) per image; regions inside the capsule
REGIONS = {
    NAMES[0]: [("Capsule", (4, 4, 27, 19)), ("Central Echo Complex", (12, 9, 19, 14)),
               ("Medulla", (6, 6, 9, 9)), ("Cortex", (22, 6, 25, 17))],
    NAMES[1]: [("Capsule", (2, 2, 10, 10))],
}


def expected(name: str) -> np.ndarray:
    code = {"Capsule": 1, "Central Echo Complex": 2, "Medulla": 3, "Cortex": 4}
    m = np.zeros((H, W), np.int64)
    for anatomy, (x0, y0, x1, y1) in REGIONS[name]:
        m[y0:y1 + 1, x0:x1 + 1] = code[anatomy]
    return m


def make_images(root: Path, extra: bool = True) -> Path:
    rng = np.random.default_rng(2)
    d = root / "images"
    d.mkdir(parents=True)
    for name in NAMES + (["999_IM-0000-0001_anon.png"] if extra else []):
        Image.fromarray(rng.integers(0, 256, (H, W), dtype=np.uint8)).save(d / name)
    return root


def make_csv(root: Path, reviewer: int = 1, regions=REGIONS) -> Path:
    labels = root / "labels"
    labels.mkdir(parents=True, exist_ok=True)
    path = labels / f"reviewed_labels_{reviewer}.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "file_size", "file_attributes", "region_count", "region_id",
                    "region_shape_attributes", "region_attributes"])
        for name, regs in regions.items():
            attrs = json.dumps({"Quality": "Fair", "View": "Transverse", "Comments": "n/a"})
            for i, (anatomy, box) in enumerate(regs):
                w.writerow([name, 1234, attrs, len(regs), i, json.dumps(_rect(*box)),
                            json.dumps({"Anatomy": anatomy})])
    return path


def make_masks(root: Path, reviewer: int = 1) -> None:
    base = root / "labels" / f"reviewed_masks_{reviewer}"
    (base / "capsule").mkdir(parents=True)
    (base / "regions").mkdir()
    for name in NAMES:
        full = expected(name)
        capsule = np.zeros((H, W), np.uint8)
        x0, y0, x1, y1 = REGIONS[name][0][1]
        capsule[y0:y1 + 1, x0:x1 + 1] = 1
        regions = np.where(full >= 2, full - 1, 0).astype(np.uint8)
        Image.fromarray(capsule).save(base / "capsule" / name)
        Image.fromarray(regions).save(base / "regions" / name)


def test_kidneyus_from_via_csv_polygons(tmp_path):
    src = make_images(tmp_path / "kidneyUS")
    make_csv(src)
    summary = convert("kidneyus", src, tmp_path / "out", size=0)
    info = load_dataset_info(tmp_path / "out")
    assert info.labels == {0: "background", 1: "capsule", 2: "central echo complex",
                           3: "medulla", 4: "cortex"}
    assert info.case_ids == tuple(Path(n).stem for n in NAMES)
    for name in NAMES:
        image, mask = read_case(info, Path(name).stem)
        assert np.array_equal(mask, expected(name))
        assert np.array_equal(image[..., 0], np.asarray(Image.open(src / "images" / name)))
    assert summary.n_images == 2 and info.splits is None
    assert any("1 images without annotations" in n for n in summary.notes)


def test_kidneyus_from_repository_masks_default_512(tmp_path):
    src = make_images(tmp_path / "kidneyUS", extra=False)
    make_masks(src)
    make_csv(src, regions={NAMES[0]: [("Capsule", (0, 0, 1, 1))]})  # masks take precedence
    convert("kidneyus", src, tmp_path / "out")
    info = load_dataset_info(tmp_path / "out")
    image, mask = read_case(info, Path(NAMES[0]).stem)
    assert image.shape == (512, 512, 3)
    # nearest neighbour: output pixel centre (i + 0.5) * 24 / 512 falls in source row i'
    rows = ((np.arange(512) + 0.5) * H / 512).astype(int)
    cols = ((np.arange(512) + 0.5) * W / 512).astype(int)
    assert np.array_equal(mask, expected(NAMES[0])[np.ix_(rows, cols)])


def test_kidneyus_reviewer_2_and_masks_match_csv(tmp_path):
    src = make_images(tmp_path / "a", extra=False)
    make_csv(src, reviewer=2)
    convert("kidneyus", src, tmp_path / "csv", reviewer=2, size=0)
    src_m = make_images(tmp_path / "b", extra=False)
    make_masks(src_m, reviewer=2)
    convert("kidneyus", src_m, tmp_path / "masks", reviewer=2, size=0)
    a, b = load_dataset_info(tmp_path / "csv"), load_dataset_info(tmp_path / "masks")
    for cid in a.case_ids:
        assert np.array_equal(read_case(a, cid)[1], read_case(b, cid)[1])
    with pytest.raises(DatasetError, match="reviewed_labels_1.csv"):
        convert("kidneyus", src, tmp_path / "r1", size=0)  # only reviewer 2 present
    assert not (tmp_path / "r1").exists()


def test_kidneyus_errors_name_the_problem(tmp_path):
    src = make_images(tmp_path / "k", extra=False)
    make_csv(src, regions={**REGIONS, "404_IM-0000-0000_anon.png": [("Capsule", (1, 1, 3, 3))]})
    with pytest.raises(DatasetError, match="404_IM-0000-0000_anon.png"):
        convert("kidneyus", src, tmp_path / "out", size=0)
    make_csv(src, regions={NAMES[0]: [("Ureter", (1, 1, 3, 3))]})
    with pytest.raises(DatasetError, match="unknown anatomy 'Ureter'"):
        convert("kidneyus", src, tmp_path / "out", size=0)
    assert not (tmp_path / "out").exists()
