"""The dataset fingerprint and resolution plan on masks whose structures are known by
construction (lines of a drawn width, squares of a drawn size)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tskd.data.fingerprint import (compute_fingerprint, fingerprint_masks, format_fingerprint,
                                   object_areas, plan_resolution, size_warnings,
                                   structure_widths)
from tskd.data.format import load_dataset_info, write_dataset_json


def _lines(size: int, widths: list[int], label: int = 1, length: int | None = None
           ) -> np.ndarray:
    """Horizontal lines of the given widths, 10 px apart, from x=4 to x=4+length."""
    m = np.zeros((size, size), np.int64)
    y = 4
    for w in widths:
        m[y:y + w, 4:4 + (length or size - 8)] = label
        y += w + 10
    return m


@pytest.mark.parametrize("width", [1, 2, 3, 4, 8])
def test_widths_of_horizontal_lines_are_exact(width):
    m = np.zeros((48, 48), bool)
    m[20:20 + width, 3:45] = True
    widths = structure_widths(m)
    assert widths.size > 0
    np.testing.assert_allclose(widths, float(width))


@pytest.mark.parametrize("width", [2, 4, 8])
def test_widths_of_diagonal_lines_are_close(width):
    yy, xx = np.mgrid[0:96, 0:96]
    m = np.abs(yy - xx) / np.sqrt(2) < width / 2  # a 45-degree band of true width `width`
    assert abs(np.median(structure_widths(m)) - width) <= 0.15 * width + 0.5


def test_object_areas_count_components_with_8_connectivity():
    m = np.zeros((20, 20), bool)
    m[1:4, 1:4] = True          # 9 px
    m[10, 10] = m[11, 11] = True  # diagonal neighbours: one object of 2 px
    m[15:17, 2:7] = True        # 10 px
    assert sorted(object_areas(m).tolist()) == [2, 9, 10]


def test_fingerprint_of_known_classes():
    # class 1: lines 2 px wide; class 2: lines 8 px wide; class 3: four 5x5 squares
    masks = []
    for _ in range(3):
        m = _lines(64, [2, 2], label=1)
        m[40:48, 4:60] = 2
        for y, x in [(52, 4), (52, 14), (52, 24), (52, 34)]:
            m[y:y + 5, x:x + 5] = 3
        masks.append(m)
    fp = fingerprint_masks(masks, ["background", "thin", "thick", "dots"], name="synthetic")
    thin, thick, dots = fp.classes["thin"], fp.classes["thick"], fp.classes["dots"]
    assert thin.width_px == 2 and thin.thin_width_px == 2
    assert thick.width_px == 8
    assert dots.width_px == 5
    assert thin.objects_per_image == 2 and dots.objects_per_image == 4
    assert thin.object_px == 2 * 56 and dots.object_px == 25 and dots.small_object_px == 25
    assert thin.pixel_share == pytest.approx(2 * 2 * 56 / 64**2)
    assert fp.native_size == 64 and fp.n_measured == 3


def test_plan_keeps_thin_lines_and_shrinks_thick_ones():
    thin = fingerprint_masks([_lines(256, [2, 2, 2])], ["background", "vessel"])
    plan = plan_resolution(thin)
    assert plan.working_size == 256 and plan.image_size == 256 and not plan.needs_patches
    assert plan.limiting_class == "vessel" and plan.warnings == []
    thick = fingerprint_masks([_lines(256, [8, 8])], ["background", "band"])
    # 8 px at native: a quarter of the size keeps them 2 px wide, but not below min_size
    assert plan_resolution(thick, min_size=32).working_size == 64
    assert plan_resolution(thick).working_size == 128


def test_plan_needs_patches_beyond_max_size():
    fp = fingerprint_masks([_lines(1024, [2, 3])], ["background", "vessel"])
    plan = plan_resolution(fp, max_size=512)
    # patches keep the working size: 512-px crops of the 1024-px images, no warning
    assert plan.working_size == 1024 and plan.needs_patches and plan.image_size == 1024
    assert plan.patch_size == 512 and plan.warnings == []


def test_size_warnings_name_the_class_and_the_field():
    fp = fingerprint_masks([_lines(512, [3, 3], label=1) + _lines(512, [40], label=2)
                            * (_lines(512, [3, 3]) == 0)], ["background", "vessel", "organ"])
    warnings = size_warnings(fp, {"data.image_size": 128, "teacher.img_size": 512})
    assert len(warnings) == 1
    assert "'vessel'" in warnings[0] and "data.image_size=128" in warnings[0]
    assert "0.75 px" in warnings[0]  # 3 px * 128 / 512


def test_small_objects_vanish_warning():
    m = np.zeros((256, 256), np.int64)
    for x in range(10, 250, 20):
        m[100:103, x:x + 3] = 1  # 3x3 dots: 9 px, 0.56 px at a quarter of the size
    warnings = size_warnings(fingerprint_masks([m], ["background", "dot"]),
                             {"data.image_size": 64})
    assert any("vanish" in w and "'dot'" in w for w in warnings)


def test_compute_fingerprint_reads_a_dataset(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 60, 3), 100, np.uint8)).save(tmp_path / f"images/c{i}.png")
        m = np.zeros((40, 60), np.uint8)
        m[10:14, 5:55] = 1
        Image.fromarray(m).save(tmp_path / f"masks/c{i}.png")
    write_dataset_json(tmp_path, name="lines", modality="CT",
                       labels={0: "background", 1: "line"}, spacing=[0.5, 0.5])
    fp = compute_fingerprint(load_dataset_info(tmp_path))
    assert fp.classes["line"].width_px == 4 and fp.native_size == 60
    assert fp.height["median"] == 40 and fp.spacing == [0.5, 0.5]
    text = format_fingerprint(fp, plan_resolution(fp))
    assert "line" in text and "plan: working size" in text


def _vessel_dataset(root, size=256, n=6):
    """Horizontal 3-px lines on ``size`` px images (a thin class) and a train/test split."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    ids = [f"c{i}" for i in range(n)]
    for case in ids:
        Image.fromarray(np.full((size, size, 3), 90, np.uint8)).save(root / f"images/{case}.png")
        Image.fromarray(_lines(size, [3, 3, 3]).astype(np.uint8)).save(root / f"masks/{case}.png")
    write_dataset_json(root, name="lines", modality="CT", labels={0: "background", 1: "vessel"},
                       splits={"train": ids[:4], "test": ids[4:]})
    return root


def test_auto_image_size_takes_the_plan_and_explicit_sizes_win(tmp_path):
    from tskd.config import ConfigError, load_config
    from tskd.data.fingerprint import plan_for_config, resolve_image_size

    root = _vessel_dataset(tmp_path / "d")
    base = [f"data.root={root}", "data.n_labels=4", "data.val_share=0.25"]
    cfg = resolve_image_size(load_config(None, base))
    # 3-px lines stay 2 px wide at 2/3 of 256 = 170.7 px: the next multiple of 32 is 192
    assert cfg.data.image_size == 192
    explicit = load_config(None, [*base, "data.image_size=128"])
    assert resolve_image_size(explicit).data.image_size == 128
    _, plan, warnings = plan_for_config(load_dataset_info(root), explicit)
    assert plan.image_size == 192 and plan.native_size == 256
    assert any("'vessel'" in w and "data.image_size=128" in w for w in warnings)
    demo = resolve_image_size(load_config(None, ["data.demo.size=96"]))
    assert demo.data.image_size == 96
    # beyond data.max_image_size: the planned 192 px kept, trained on 64-px patches
    patched = resolve_image_size(load_config(None, [*base, "data.max_image_size=64"]))
    assert (patched.data.image_size, patched.data.patch, patched.data.patches) == (192, 64, True)
    _, _, warnings = plan_for_config(load_dataset_info(root), patched)
    assert warnings == []  # 3-px lines at 192/256: 2.25 px; the teacher's 128 px per 64-px patch
    explicit_patch = resolve_image_size(load_config(None, [*base, "data.patch_size=48"]))
    assert (explicit_patch.data.image_size, explicit_patch.data.patch) == (192, 48)
    with pytest.raises(ConfigError, match="data.image_size"):
        load_config(None, ["data.image_size=big"])


def test_inspect_prints_the_plan_and_warns_for_a_small_size(tmp_path, capsys):
    from tskd.cli import main

    root = _vessel_dataset(tmp_path / "d")
    assert main(["inspect", str(root), "--set", "data.image_size=128"]) == 0
    out = capsys.readouterr().out
    assert "vessel" in out and "plan: working size" in out
    assert "warning: class 'vessel'" in out and "data.image_size=128" in out


def test_teacher_size_puts_one_logit_cell_across_thin_structures():
    from tskd.data.fingerprint import teacher_logit_warnings

    fp = fingerprint_masks([_lines(128, [2, 2, 2])], ["background", "vessel"])
    plan = plan_resolution(fp)
    # SAM's logits are 1/4 of its input: 2-px lines need 4 * 128 / 2 = 256 px to fill a cell
    assert plan.image_size == 128 and plan.teacher_img_size == 256
    warnings = teacher_logit_warnings(fp, 128)
    assert len(warnings) == 1 and "'vessel'" in warnings[0] and "span 0.50" in warnings[0]
    assert teacher_logit_warnings(fp, 256) == []
    thick = fingerprint_masks([_lines(128, [16])], ["background", "organ"])
    assert plan_resolution(thick).teacher_img_size == 128  # never below the data's size
