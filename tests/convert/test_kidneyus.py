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


# ----------------------------------------------------------------------------------------------
# The official data's quirks: copies, empty annotations, degenerate regions, spacing, resizing
# ----------------------------------------------------------------------------------------------

from tskd.convert.kidneyus import is_degenerate  # noqa: E402
from tskd.data.format import make_splits  # noqa: E402

ORIG, COPY1, COPY2, EMPTY, STRAY = ("102_IM-0262-0009_anon.png", "400_IM-0262-0009_anon.png",
                                    "404_IM-0262-0009_anon.png", "7_IM-0100-0001_anon.png",
                                    "169_IM-0885-0035_anon.png")


def make_quirky(root: Path) -> Path:
    """Images: NAMES (unique), ORIG + two byte-identical copies, an image annotated without
    regions, and one whose reviewer-1 annotation has a stray capsule strip at the top."""
    rng = np.random.default_rng(9)
    d = root / "images"
    d.mkdir(parents=True)
    for name in NAMES + [ORIG, EMPTY, STRAY]:
        Image.fromarray(rng.integers(0, 256, (H, W), dtype=np.uint8)).save(d / name)
    for copy in (COPY1, COPY2):
        (d / copy).write_bytes((d / ORIG).read_bytes())
    labels = root / "labels"
    labels.mkdir()
    with (labels / "reviewed_labels_1.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "file_size", "file_attributes", "region_count", "region_id",
                    "region_shape_attributes", "region_attributes"])
        for name in NAMES + [ORIG, COPY1, COPY2]:
            regs = REGIONS.get(name, [("Capsule", (3, 3, 12, 12))])
            for i, (anatomy, box) in enumerate(regs):
                w.writerow([name, 1, "{}", len(regs), i, json.dumps(_rect(*box)),
                            json.dumps({"Anatomy": anatomy})])
        w.writerow([EMPTY, 1, "{}", 0, 0, "{}", "{}"])  # region_count 0
        # the real stray: a VIA rect 517x11 at y=7 of a 960x720 image; here 30x1 at y=0
        w.writerow([STRAY, 1, "{}", 2, 0, json.dumps({"name": "rect", "x": 1, "y": 0,
                                                      "width": 30, "height": 1}),
                    json.dumps({"Anatomy": "Capsule"})])
        w.writerow([STRAY, 1, "{}", 2, 1, json.dumps(_rect(5, 6, 20, 18)),
                    json.dumps({"Anatomy": "Capsule"})])
    return root


def write_sheet(path: Path, rows: list[tuple[str, float, float]]) -> Path:
    """The transducer sheet's layout (Sheet1: Filename without _anon, Physical Delta X/Y in cm
    per pixel; the real sheet also has Manufacturer, ... columns), written with pandas."""
    import pandas as pd

    pd.DataFrame({"Filename": [r[0] for r in rows], "Manufacturer": "ACME",
                  "Physical Delta X": [r[1] for r in rows],
                  "Physical Delta Y": [r[2] for r in rows]}).to_excel(path, index=False)
    return path


def test_is_degenerate_rule():
    # reviewer 1's stray capsule on 169_IM-0885-0035 (960x720): rect x=198, y=7, 517x11
    assert is_degenerate((198, 7, 198 + 517, 7 + 11), (720, 960))
    assert not is_degenerate((300, 150, 700, 450), (720, 960))  # a kidney
    assert not is_degenerate((300, 5, 700, 300), (720, 960))  # touches the top, but tall
    assert is_degenerate((100, 400, 650, 420), (720, 960))  # 550x20: aspect 27.5 > 20
    assert not is_degenerate((100, 400, 500, 421), (720, 960))  # aspect 19
    assert is_degenerate((10, 10, 10, 50), (720, 960))  # zero width


def test_kidneyus_copies_grouped_empty_skipped_stray_ignored(tmp_path, caplog):
    src = make_quirky(tmp_path / "kidneyUS")
    summary = convert("kidneyus", src, tmp_path / "out", size=0)
    info = load_dataset_info(tmp_path / "out")
    stem = lambda n: Path(n).stem  # noqa: E731
    assert stem(EMPTY) not in info.case_ids  # no regions: skipped, not all-background
    assert len(info.case_ids) == 6
    assert any("1 annotated images with no kidney region" in n for n in summary.notes)
    # copies share their original's group; unique images have none
    assert info.groups == {stem(ORIG): stem(ORIG), stem(COPY1): stem(ORIG),
                           stem(COPY2): stem(ORIG)}
    assert any("2 images are byte-identical copies" in n for n in summary.notes)
    checked = 0
    for seed in range(12):
        try:
            s = make_splits(info, n_labels=2, n_val=1, seed=seed, test_fraction=0.2)
        except DatasetError as e:  # a budget inside the 3 copies cannot give a validation
            assert "without splitting a group" in str(e)
            continue
        sides = [{info.group_of(c) for c in part} for part in (s.test, s.val, s.labelled)]
        assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
        checked += 1
    assert checked >= 6
    # the stray strip is ignored (warned), the real capsule kept
    _, mask = read_case(info, stem(STRAY))
    ref = np.zeros((H, W), np.int64)
    ref[6:19, 5:21] = 1
    assert np.array_equal(mask, ref)
    assert "degenerate region" in caplog.text and STRAY in caplog.text
    assert info.spacing is None and info.spacing_per_case is None  # no sheet


def test_kidneyus_spacing_from_transducer_sheet_and_letterbox(tmp_path, capsys):
    src = make_quirky(tmp_path / "kidneyUS")
    write_sheet(src / "OpenKidneyUltrasoundDataSet_TransducerInfo.xlsx", [
        ("1_IM-0001-0059", 1.0, 1.0),           # placeholder 1s: unknown
        ("2_IM-0383-0001", -0.02, 0.025),        # sign = direction
        ("102_IM-0262-0009", 0.03, 0.03),        # its copies (not in the sheet) use it
        ("169_IM-0885-0035", 0.01, 0.02)])
    # 24x32 images letterboxed to 64x64: scale 2 (32 -> 64 wide, 24 -> 48 high, 8 px bars)
    from tskd.cli import main
    assert main(["convert", "kidneyus", str(src), str(tmp_path / "out"), "--size", "64",
                 "--resize", "letterbox"]) == 0
    out = capsys.readouterr().out
    assert "64x64 px (letterbox)" in out and "placeholder" in out
    info = load_dataset_info(tmp_path / "out")
    mm = lambda dy, dx: (10 * dy / 2, 10 * dx / 2)  # noqa: E731  cm -> mm, then the x2 zoom
    assert info.spacing_of("2_IM-0383-0001_anon") == pytest.approx(mm(0.025, 0.02))
    for c in (ORIG, COPY1, COPY2):
        assert info.spacing_of(Path(c).stem) == pytest.approx(mm(0.03, 0.03))
    assert info.spacing_of("169_IM-0885-0035_anon") == pytest.approx(mm(0.02, 0.01))
    known = np.array([mm(0.025, 0.02), *[mm(0.03, 0.03)] * 3, mm(0.02, 0.01)])
    assert "1_IM-0001-0059_anon" not in info.spacing_per_case
    assert info.spacing_of("1_IM-0001-0059_anon") == pytest.approx(tuple(np.median(known, 0)))
    # letterbox: the 24x32 image is scaled x2 into rows 8..55, zero bars above and below
    image, mask = read_case(info, "2_IM-0383-0001_anon")
    raw = np.asarray(Image.open(src / "images" / NAMES[1]))
    assert image.shape == (64, 64, 3) and not image[:8].any() and not image[56:].any()
    ref = np.zeros((64, 64), np.int64)
    ref[8:56] = np.kron(expected(NAMES[1]), np.ones((2, 2), np.int64))
    assert np.array_equal(mask, ref)
    assert np.abs(image[8:56:2, 0::2, 0].astype(int) - raw).mean() < 40  # same picture


def test_cli_convert_reviewer_2(tmp_path, capsys):
    from tskd.cli import main
    src = make_images(tmp_path / "k", extra=False)
    make_csv(src, reviewer=2)
    assert main(["convert", "kidneyus", str(src), str(tmp_path / "o1"), "--size", "0"]) == 2
    assert "reviewer 1" in capsys.readouterr().err
    assert main(["convert", "kidneyus", str(src), str(tmp_path / "o2"), "--size", "0",
                 "--reviewer", "2"]) == 0
    assert "KidneyUS-reviewer2" in capsys.readouterr().out
