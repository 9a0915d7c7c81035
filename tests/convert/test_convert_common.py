"""tskd.convert.common: atomic writer, resizing, summaries, registry dispatch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tskd.convert import CONVERTERS, convert
from tskd.convert.common import (DatasetWriter, as_size, atomic_directory, read_binary_mask,
                                 resize_mask, scaled_spacing)
from tskd.data.format import DatasetError, load_dataset_info, read_case

LABELS = {0: "background", 1: "a", 2: "b"}


def _case(h=4, w=6, value=1):
    image = np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3)
    mask = np.zeros((h, w), np.int64)
    mask[:, : w // 2] = value
    return image, mask


def test_writer_writes_valid_dataset_and_summary(tmp_path):
    dst = tmp_path / "out"
    with DatasetWriter(dst, fmt="test", src=tmp_path) as out:
        img, m = _case(value=1)
        out.add("c1", img, m)
        img2, m2 = _case(value=2)
        out.add("c2", img2, m2)
        summary = out.finish(name="t", modality="US", labels=LABELS, spacing=[0.5, 0.25],
                             splits={"train": ["c1"], "test": ["c2"]})
    info = load_dataset_info(dst)
    assert info.case_ids == ("c1", "c2")
    image, mask = read_case(info, "c1")
    assert np.array_equal(image, img) and np.array_equal(mask, m)
    assert summary.n_images == 2 and summary.splits == {"train": 1, "test": 1}
    # 48 pixels: background 24, a 12, b 12
    assert summary.pixel_share == pytest.approx({"background": 0.5, "a": 0.25, "b": 0.25})
    assert "background" in summary.format_text() and "c1" not in summary.format_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_writer_error_leaves_no_destination_and_no_temp(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(DatasetError, match="undeclared|only 0..1"):
        with DatasetWriter(dst, fmt="test", src=tmp_path) as out:
            img, m = _case(value=2)
            out.add("c1", img, m)
            out.finish(name="t", modality="US", labels={0: "bg", 1: "a"})
    assert not dst.exists()
    assert list(tmp_path.iterdir()) == []


def test_writer_without_finish_or_cases_fails(tmp_path):
    with pytest.raises(DatasetError, match="without finish"):
        with DatasetWriter(tmp_path / "a", fmt="test", src=tmp_path) as out:
            out.add("c1", *_case())
    with pytest.raises(DatasetError, match="no cases"):
        with DatasetWriter(tmp_path / "b", fmt="test", src=tmp_path) as out:
            out.finish(name="t", modality="US", labels=LABELS)
    assert list(tmp_path.iterdir()) == []


def test_destination_must_be_absent_or_empty(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(DatasetError, match="already exists"):
        DatasetWriter(dst, fmt="test", src=tmp_path)
    assert (dst / "keep.txt").read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_directory(empty) as tmp:
        (tmp / "f").write_text("y")
    assert (empty / "f").read_text() == "y"


def test_duplicate_ids_and_size_mismatch_are_errors(tmp_path):
    with pytest.raises(DatasetError, match="two cases"):
        with DatasetWriter(tmp_path / "a", fmt="t", src=tmp_path) as out:
            out.add("c", *_case())
            out.add("c", *_case())
    with pytest.raises(DatasetError, match="differs"):
        with DatasetWriter(tmp_path / "b", fmt="t", src=tmp_path) as out:
            out.add("c", _case()[0], np.zeros((3, 3), np.int64))
    assert list(tmp_path.iterdir()) == []


def test_resize_nearest_for_masks_and_spacing():
    mask = np.zeros((4, 8), np.int64)
    mask[:, 4:] = 3
    out = resize_mask(mask, (2, 4))
    assert out.tolist() == [[0, 0, 3, 3], [0, 0, 3, 3]]
    assert set(np.unique(resize_mask(mask, (7, 5)))) <= {0, 3}  # never an interpolated value
    assert as_size(8) == (8, 8) and as_size(0) is None and as_size(None) is None
    assert scaled_spacing((1.5, 2.0), (12, 16), (256, 256)) == pytest.approx(
        (1.5 * 12 / 256, 2.0 * 16 / 256))


def test_writer_resizes_image_mask_and_fov(tmp_path):
    img, m = _case(h=4, w=8)
    fov = np.zeros((4, 8), bool)
    fov[1:3] = True
    with DatasetWriter(tmp_path / "o", fmt="t", src=tmp_path, size=(2, 4)) as out:
        out.add("c", img, m, fov=fov)
        out.finish(name="t", modality="US", labels=LABELS)
    info = load_dataset_info(tmp_path / "o")
    image, mask = read_case(info, "c")
    assert image.shape == (2, 4, 3)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    assert info.has_fov


def test_read_binary_mask_variants(tmp_path):
    from PIL import Image

    a = np.zeros((4, 4), np.uint8)
    a[0] = 255
    Image.fromarray(a).save(tmp_path / "l.png")
    Image.fromarray(a > 0).save(tmp_path / "one.bmp")  # 1-bit
    Image.fromarray((a > 0).astype(np.uint8)).save(tmp_path / "01.png")
    Image.fromarray(np.stack([a] * 3, 2)).save(tmp_path / "rgb.bmp")
    for name in ("l.png", "one.bmp", "01.png", "rgb.bmp"):
        got = read_binary_mask(tmp_path / name)
        assert got.tolist() == (a > 0).tolist(), name


def test_registry_dispatch_errors(tmp_path):
    assert set(CONVERTERS) == {"ph2", "drive", "chaos", "kidneyus", "autooral", "nnunet",
                               "nnunet-export"}
    with pytest.raises(DatasetError, match="invalid value 'nope'"):
        convert("nope", tmp_path, tmp_path / "o")
    with pytest.raises(DatasetError, match="does not take option"):
        convert("ph2", tmp_path, tmp_path / "o", sequence="T2SPIR")
    assert not (tmp_path / "o").exists()


def test_cli_format_list_matches_registry():
    from tskd.cli import CONVERT_FORMATS

    assert tuple(CONVERTERS) == CONVERT_FORMATS
    json.dumps({k: v.description for k, v in CONVERTERS.items()})  # descriptions are plain text
