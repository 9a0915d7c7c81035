"""tskd.data.format: dataset.json parsing, pairing, validation errors, readers and splits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tskd.data.format import (DatasetError, Splits, load_dataset_info, make_splits, read_case,
                              read_fov, read_image, read_mask, validate_dataset,
                              write_dataset_json)

LABELS = {0: "background", 1: "organ", 2: "lesion"}


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


def _dataset(root: Path, n: int = 4, h: int = 8, w: int = 8, labels: dict | None = None,
             splits: dict | None = None, seed: int = 0) -> Path:
    """A tiny valid dataset: RGB images, label masks with values 0..C-1, ids case_0..."""
    labels = labels or LABELS
    rng = np.random.default_rng(seed)
    for i in range(n):
        _png(root / "images" / f"case_{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        _png(root / "masks" / f"case_{i}.png",
             rng.integers(0, len(labels), (h, w)).astype(np.uint8))
    write_dataset_json(root, name="tiny", modality="US", labels=labels, spacing=[0.5, 0.25],
                       splits=splits)
    return root


def _json(root: Path, **fields) -> None:
    meta = {"name": "tiny", "modality": "US", "labels": {"0": "background", "1": "organ"}}
    meta.update(fields)
    meta = {k: v for k, v in meta.items() if v is not None}
    (root / "dataset.json").write_text(json.dumps(meta))


# ----------------------------------------------------------------------------------------------
# Parsing and pairing
# ----------------------------------------------------------------------------------------------


def test_load_dataset_info_fields(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "ds", n=3, splits={"train": ["case_1", "case_0"],
                                                   "test": ["case_2"]})
    info = load_dataset_info(root)
    assert info.name == "tiny" and info.modality == "US"
    assert info.labels == LABELS and info.num_classes == 3
    assert info.class_names == ["background", "organ", "lesion"]
    assert info.spacing == (0.5, 0.25)
    assert info.case_ids == ("case_0", "case_1", "case_2")
    assert info.splits == {"train": ["case_0", "case_1"], "test": ["case_2"]}
    assert not info.has_fov and read_fov(info, "case_0") is None


def test_labels_with_int_keys_and_unordered(tmp_path: Path) -> None:
    _dataset(tmp_path, n=2)
    _json(tmp_path, labels={"2": "lesion", "0": "background", "1": "organ"})
    assert load_dataset_info(tmp_path).class_names == ["background", "organ", "lesion"]


def test_mixed_extensions_pair_by_stem(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:10, 0:12]
    img = np.stack([yy * 20, xx * 20, np.full_like(yy, 128)], axis=2).astype(np.uint8)
    (tmp_path / "images").mkdir()
    Image.fromarray(img).save(tmp_path / "images" / "a.JPG", format="JPEG", quality=95)
    Image.fromarray(img).save(tmp_path / "images" / "b.tif")
    Image.fromarray(img).save(tmp_path / "images" / "c.bmp")
    for stem in "abc":
        _png(tmp_path / "masks" / f"{stem}.png", np.zeros((10, 12), np.uint8))
    (tmp_path / "images" / "notes.txt").write_text("ignored")
    _json(tmp_path)
    info = validate_dataset(tmp_path)
    assert info.case_ids == ("a", "b", "c")
    assert info.images["a"].name == "a.JPG"
    b, _ = read_case(info, "b")
    np.testing.assert_array_equal(b, img)  # lossless TIFF
    a, _ = read_case(info, "a")
    assert a.shape == (10, 12, 3) and np.abs(a.astype(int) - img).mean() < 8  # lossy JPEG


@pytest.mark.parametrize("text, needle", [
    ("{name: tiny", "not valid JSON"),
    ("[1, 2]", "JSON object"),
])
def test_bad_json(tmp_path: Path, text: str, needle: str) -> None:
    _dataset(tmp_path)
    (tmp_path / "dataset.json").write_text(text)
    with pytest.raises(DatasetError, match=needle) as e:
        load_dataset_info(tmp_path)
    assert "dataset.json" in str(e.value)


def test_missing_dataset_json(tmp_path: Path) -> None:
    _dataset(tmp_path)
    (tmp_path / "dataset.json").unlink()
    with pytest.raises(DatasetError, match="dataset.json"):
        load_dataset_info(tmp_path)


@pytest.mark.parametrize("fields, needle", [
    ({"name": None}, "'name'"),
    ({"modality": 3}, "'modality'"),
    ({"labels": None}, "'labels' is missing"),
    ({"labels": {"1": "organ", "2": "lesion"}}, "must declare 0"),
    ({"labels": {"0": "background", "1": "organ", "3": "x"}}, "contiguous"),
    ({"labels": {"0": "background"}}, "only background"),
    ({"labels": {"0": "background", "one": "organ"}}, "'one'"),
    ({"labels": {"0": "background", "1": ""}}, "labels.1"),
    ({"spacing": [0.5]}, "'spacing'"),
    ({"spacing": [0.5, -1]}, "'spacing'"),
    ({"spacing": "0.5"}, "'spacing'"),
    ({"splits": {"train": ["case_0", "nope"]}}, r"splits\.train.*nope"),
    ({"splits": {"train": ["case_0"], "test": ["case_0"]}}, "share"),
    ({"splits": {"test": "case_0"}}, r"splits\.test"),
])
def test_bad_fields(tmp_path: Path, fields: dict, needle: str) -> None:
    _dataset(tmp_path, n=2)
    _json(tmp_path, **fields)
    with pytest.raises(DatasetError, match=needle) as e:
        load_dataset_info(tmp_path)
    assert "dataset.json" in str(e.value)


def test_image_without_mask(tmp_path: Path) -> None:
    _dataset(tmp_path)
    (tmp_path / "masks" / "case_2.png").unlink()
    with pytest.raises(DatasetError, match=r"images/case_2\.png: no matching mask"):
        load_dataset_info(tmp_path)


def test_mask_without_image(tmp_path: Path) -> None:
    _dataset(tmp_path)
    _png(tmp_path / "masks" / "stray.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DatasetError, match=r"masks/stray\.png: no matching image"):
        load_dataset_info(tmp_path)


def test_no_images(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    _json(tmp_path)
    with pytest.raises(DatasetError, match=r"images: no images"):
        load_dataset_info(tmp_path)


def test_missing_masks_dir(tmp_path: Path) -> None:
    _png(tmp_path / "images" / "a.png", np.zeros((8, 8), np.uint8))
    _json(tmp_path)
    with pytest.raises(DatasetError, match=r"masks: directory is missing"):
        load_dataset_info(tmp_path)


def test_duplicate_stem(tmp_path: Path) -> None:
    _dataset(tmp_path)
    _png(tmp_path / "images" / "case_1.bmp", np.zeros((8, 8), np.uint8))
    with pytest.raises(DatasetError, match=r"case_1\.(bmp|png).*two files"):
        load_dataset_info(tmp_path)


# ----------------------------------------------------------------------------------------------
# Full validation
# ----------------------------------------------------------------------------------------------


def test_validate_ok(tmp_path: Path) -> None:
    info = validate_dataset(_dataset(tmp_path, n=6), n_labels=3, n_val=1)
    assert len(info.case_ids) == 6


def test_corrupt_image(tmp_path: Path) -> None:
    _dataset(tmp_path)
    (tmp_path / "images" / "case_1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage garbage")
    with pytest.raises(DatasetError, match=r"images/case_1\.png: unreadable or corrupt"):
        validate_dataset(tmp_path)


def test_truncated_image(tmp_path: Path) -> None:
    _dataset(tmp_path, h=16, w=16)
    path = tmp_path / "images" / "case_3.png"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DatasetError, match=r"images/case_3\.png: unreadable or corrupt"):
        validate_dataset(tmp_path)


def test_corrupt_mask(tmp_path: Path) -> None:
    _dataset(tmp_path)
    (tmp_path / "masks" / "case_0.png").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=r"masks/case_0\.png: unreadable or corrupt"):
        validate_dataset(tmp_path)


def test_size_mismatch(tmp_path: Path) -> None:
    _dataset(tmp_path, h=8, w=8)
    _png(tmp_path / "masks" / "case_0.png", np.zeros((8, 10), np.uint8))  # 10 wide, 8 high
    with pytest.raises(DatasetError) as e:
        validate_dataset(tmp_path)
    msg = str(e.value)
    assert "masks/case_0.png" in msg and "10x8" in msg and "8x8" in msg


def test_undeclared_label_values(tmp_path: Path) -> None:
    _dataset(tmp_path)
    bad = np.zeros((8, 8), np.uint8)
    bad[0, 0], bad[1, 1], bad[2, 2] = 1, 5, 7
    _png(tmp_path / "masks" / "case_2.png", bad)
    with pytest.raises(DatasetError, match=r"masks/case_2\.png: mask has undeclared label "
                                           r"values \[5, 7\]"):
        validate_dataset(tmp_path)


def test_several_problems_reported_together(tmp_path: Path) -> None:
    _dataset(tmp_path)
    (tmp_path / "images" / "case_0.png").write_bytes(b"junk")
    _png(tmp_path / "masks" / "case_3.png", np.full((8, 8), 9, np.uint8))
    with pytest.raises(DatasetError) as e:
        validate_dataset(tmp_path)
    assert "2 invalid case(s)" in str(e.value)
    assert "case_0.png" in str(e.value) and "case_3.png" in str(e.value)


def test_empty_split(tmp_path: Path) -> None:
    _dataset(tmp_path, splits={"train": ["case_0", "case_1", "case_2", "case_3"], "test": []})
    load_dataset_info(tmp_path)  # parsing alone accepts it
    with pytest.raises(DatasetError, match=r"dataset\.json: field 'splits\.test' is empty"):
        validate_dataset(tmp_path)


def test_too_few_training_images(tmp_path: Path) -> None:
    _dataset(tmp_path, n=5)  # no splits: 1 of 5 held out for test (20%) -> 4 train
    with pytest.raises(DatasetError) as e:
        validate_dataset(tmp_path, n_labels=5, n_val=1)
    msg = str(e.value)
    assert "too few training images" in msg
    assert re.search(r"has 4\b", msg) and re.search(r"n_labels=5\b", msg)
    validate_dataset(tmp_path, n_labels=4, n_val=1)  # exactly enough: val is inside the budget
    with pytest.raises(DatasetError, match=r"n_val=4 .*inside the label budget n_labels=4"):
        validate_dataset(tmp_path, n_labels=4, n_val=4)


def test_too_few_with_declared_splits(tmp_path: Path) -> None:
    _dataset(tmp_path, n=6, splits={"train": ["case_0", "case_1"],
                                    "test": ["case_2", "case_3", "case_4", "case_5"]})
    with pytest.raises(DatasetError, match=r"has 2 .* n_labels=3"):
        validate_dataset(tmp_path, n_labels=3)


def test_fov_directory(tmp_path: Path) -> None:
    _dataset(tmp_path, n=2)
    fov = np.zeros((8, 8), np.uint8)
    fov[2:6, 1:7] = 255
    _png(tmp_path / "fov" / "case_0.png", fov)
    with pytest.raises(DatasetError, match=r"images/case_1\.png: no matching field-of-view"):
        load_dataset_info(tmp_path)
    _png(tmp_path / "fov" / "case_1.png", np.zeros((9, 8), np.uint8))
    with pytest.raises(DatasetError, match=r"fov/case_1\.png: field-of-view size 8x9"):
        validate_dataset(tmp_path)
    _png(tmp_path / "fov" / "case_1.png", np.ones((8, 8), np.uint8))
    info = validate_dataset(tmp_path)
    got = read_fov(info, "case_0")
    assert got.dtype == bool
    np.testing.assert_array_equal(got, fov > 0)
    assert read_fov(info, "case_1").all()


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------


def test_read_grey_rgba_palette_16bit(tmp_path: Path) -> None:
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    out = read_image(_png(tmp_path / "g.png", grey))
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 0
    np.testing.assert_array_equal(read_image(_png(tmp_path / "a.png", rgba)),
                                  np.broadcast_to([10, 20, 30], (8, 8, 3)))

    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png")[0, 1], [0, 0, 255])

    deep = np.array([[0, 1000], [2000, 2000]], np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    np.testing.assert_array_equal(read_image(tmp_path / "d.png")[..., 0],
                                  [[0, 128], [255, 255]])  # min-max: 1000/2000*255 = 127.5


def test_read_mask_variants(tmp_path: Path) -> None:
    labels = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    np.testing.assert_array_equal(read_mask(_png(tmp_path / "l.png", labels), LABELS), labels)
    assert read_mask(tmp_path / "l.png", LABELS).dtype == np.int64

    pal = Image.fromarray(labels, mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png", LABELS), labels)

    rgb = np.repeat(labels[..., None], 3, axis=2)
    np.testing.assert_array_equal(read_mask(_png(tmp_path / "rgb.png", rgb), 3), labels)
    rgb[0, 0] = [1, 0, 0]
    with pytest.raises(DatasetError, match=r"rgb2\.png: colour mask"):
        read_mask(_png(tmp_path / "rgb2.png", rgb), 3)

    binary = np.array([[0, 255], [255, 0]], np.uint8)
    _png(tmp_path / "b.png", binary)
    np.testing.assert_array_equal(read_mask(tmp_path / "b.png", {0: "bg", 1: "fg"}),
                                  [[0, 1], [1, 0]])
    with pytest.raises(DatasetError, match=r"b\.png: mask has undeclared label values \[255\]"):
        read_mask(tmp_path / "b.png", LABELS)  # 3 labels: 255 is not mapped

    bits = Image.fromarray(np.array([[0, 255], [0, 0]], np.uint8)).convert("1")
    bits.save(tmp_path / "bits.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "bits.png", 2), [[0, 1], [0, 0]])

    wide = np.array([[0, 300]], np.uint16)
    Image.fromarray(wide).save(tmp_path / "w.png")
    with pytest.raises(DatasetError, match=r"\[300\]"):
        read_mask(tmp_path / "w.png", LABELS)


def test_read_case_unknown_id(tmp_path: Path) -> None:
    info = load_dataset_info(_dataset(tmp_path))
    with pytest.raises(DatasetError, match="'nope'"):
        read_case(info, "nope")


def test_write_dataset_json_validates_labels(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="contiguous"):
        write_dataset_json(tmp_path, name="x", modality="US", labels={0: "bg", 2: "x"})
    path = write_dataset_json(tmp_path, name="x", modality="US", labels={0: "bg", 1: "x"},
                              extra={"generator": {"seed": 1}})
    assert json.loads(path.read_text()) == {"name": "x", "modality": "US",
                                            "labels": {"0": "bg", "1": "x"},
                                            "generator": {"seed": 1}}


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------


def _info_with_ids(tmp_path: Path, n: int, splits: dict | None = None):
    rng = np.random.default_rng(0)
    for i in range(n):
        _png(tmp_path / "images" / f"c{i:02d}.png", rng.integers(0, 256, (4, 4), np.uint8))
        _png(tmp_path / "masks" / f"c{i:02d}.png", np.zeros((4, 4), np.uint8))
    write_dataset_json(tmp_path, name="t", modality="US", labels={0: "bg", 1: "fg"},
                       splits=splits)
    return load_dataset_info(tmp_path)


def test_splits_without_declared_test(tmp_path: Path) -> None:
    info = _info_with_ids(tmp_path, 30)
    s = make_splits(info, n_labels=12, n_val=4, seed=3)
    assert isinstance(s, Splits)
    assert len(s.test) == 6 and len(s.val) == 4 and len(s.labelled) == 8  # 12 labels in total
    assert (s.n_train_labels, s.n_val_labels, s.n_labels_used) == (8, 4, 12)
    assert len(s.unlabelled) == 30 - 6 - 12
    groups = [set(s.labelled), set(s.val), set(s.test), set(s.unlabelled)]
    assert set().union(*groups) == set(info.case_ids)
    assert sum(len(g) for g in groups) == 30  # pairwise disjoint
    assert s == make_splits(info, n_labels=12, n_val=4, seed=3)  # deterministic
    assert make_splits(info, n_labels=12, n_val=4, seed=4).labelled != s.labelled
    assert all(list(t) == sorted(t) for t in (s.labelled, s.val, s.test, s.unlabelled))


def test_label_budget_nested(tmp_path: Path) -> None:
    info = _info_with_ids(tmp_path, 30)
    small = make_splits(info, n_labels=5, n_val=2, seed=7)
    big = make_splits(info, n_labels=14, n_val=2, seed=7)
    assert set(small.labelled) < set(big.labelled)
    assert small.val == big.val and small.test == big.test
    # model selection off: the budget is all training labels, and budgets nest
    off = [make_splits(info, n_labels=n, n_val=0, seed=7) for n in (3, 9, 24)]
    assert all(s.val == () and s.n_train_labels == n for s, n in zip(off, (3, 9, 24)))
    assert set(off[0].labelled) < set(off[1].labelled) < set(off[2].labelled)
    # with a share of the budget for validation the whole budget still nests
    a = make_splits(info, n_labels=10, n_val=2, seed=7)
    b = make_splits(info, n_labels=20, n_val=4, seed=7)
    assert set(a.labelled) | set(a.val) < set(b.labelled) | set(b.val)
    assert set(a.val) < set(b.val)


def test_declared_test_split_honoured(tmp_path: Path) -> None:
    test_ids = ["c00", "c01", "c02", "c03", "c04"]
    train_ids = [f"c{i:02d}" for i in range(5, 20)]
    info = _info_with_ids(tmp_path, 20, {"train": train_ids, "test": test_ids})
    for seed in range(5):
        s = make_splits(info, n_labels=6, n_val=3, seed=seed, test_fraction=0.5)
        assert list(s.test) == test_ids
        assert set(s.val) | set(s.labelled) | set(s.unlabelled) == set(train_ids)
        assert not set(s.val) & set(s.labelled)


def test_declared_test_only(tmp_path: Path) -> None:
    info = _info_with_ids(tmp_path, 10, {"test": ["c09", "c08"]})
    s = make_splits(info, n_labels=8, n_val=0, seed=0)
    assert s.test == ("c08", "c09") and len(s.labelled) == 8 and s.unlabelled == ()


def test_declared_train_only(tmp_path: Path) -> None:
    info = _info_with_ids(tmp_path, 10, {"train": [f"c{i:02d}" for i in range(7)]})
    s = make_splits(info, n_labels=4, n_val=1, seed=2)
    assert s.test == ("c07", "c08", "c09") and len(s.unlabelled) == 3  # 7 - 4 (val inside)
    info = _info_with_ids(tmp_path / "all", 10, {"train": [f"c{i:02d}" for i in range(10)]})
    s = make_splits(info, n_labels=4, n_val=1, seed=2)
    assert len(s.test) == 2 and not set(s.test) & (set(s.labelled) | set(s.val))


def test_splits_errors(tmp_path: Path) -> None:
    info = _info_with_ids(tmp_path, 10)
    with pytest.raises(DatasetError, match=r"has 8 but the label budget is n_labels=9"):
        make_splits(info, n_labels=9, n_val=1, seed=0)
    with pytest.raises(DatasetError, match=r"n_val must be < n_labels"):
        make_splits(info, n_labels=2, n_val=2, seed=0)
    with pytest.raises(DatasetError, match="n_labels"):
        make_splits(info, n_labels=0, n_val=1, seed=0)
    with pytest.raises(DatasetError, match="test_fraction"):
        make_splits(info, n_labels=2, n_val=1, seed=0, test_fraction=1.5)


# ----------------------------------------------------------------------------------------------
# Groups (e.g. patients) and per-case spacing
# ----------------------------------------------------------------------------------------------


def _grouped_info(tmp_path: Path, sizes: list[int], splits: dict | None = None,
                  extra_groups: dict | None = None):
    """Cases g<k>_<j>: group k has sizes[k] images."""
    groups = {}
    for k, n in enumerate(sizes):
        for j in range(n):
            cid = f"g{k}_{j}"
            _png(tmp_path / "images" / f"{cid}.png", np.full((4, 4), k, np.uint8))
            _png(tmp_path / "masks" / f"{cid}.png", np.zeros((4, 4), np.uint8))
            groups[cid] = f"patient{k}"
    write_dataset_json(tmp_path, name="t", modality="MR", labels={0: "bg", 1: "fg"},
                       splits=splits, groups={**groups, **(extra_groups or {})})
    return load_dataset_info(tmp_path)


def _group_set(ids) -> set[str]:
    return {i.split("_")[0] for i in ids}


def test_groups_never_straddle_splits(tmp_path: Path) -> None:
    sizes = [3, 5, 2, 4, 6, 1, 3, 2, 5, 4, 3, 2]  # 40 images, 12 patients
    info = _grouped_info(tmp_path, sizes)
    assert info.group_of("g3_1") == "patient3"
    for seed in range(6):
        s = make_splits(info, n_labels=15, n_val=4, seed=seed, test_fraction=0.25)
        t, v, lab = _group_set(s.test), _group_set(s.val), _group_set(s.labelled)
        assert not (t & v) and not (t & lab) and not (v & lab)
        assert not t & _group_set(s.unlabelled)  # the test split holds whole groups
        assert s.n_labels_used == 15  # budgets count images, never more
        assert 1 <= s.n_val_labels <= 4
        assert len(s.test) >= 10  # round(0.25 * 40) images, whole groups
        everything = set(s.test) | set(s.val) | set(s.labelled) | set(s.unlabelled)
        assert everything == set(info.case_ids)
        # larger budget: superset of the smaller budget
        big = make_splits(info, n_labels=22, n_val=0, seed=seed, test_fraction=0.25)
        small = make_splits(info, n_labels=9, n_val=0, seed=seed, test_fraction=0.25)
        assert set(small.labelled) < set(big.labelled) and big.test == s.test


def test_groups_val_is_whole_groups_within_budget(tmp_path: Path) -> None:
    info = _grouped_info(tmp_path, [10, 10, 10, 10], splits={
        "train": [f"g{k}_{j}" for k in (0, 1, 2) for j in range(10)],
        "test": [f"g3_{j}" for j in range(10)]})
    # budget = one whole group (10) + 5 images of the next; no group part fits n_val=3, so the
    # budget's smallest group part (the 5) validates and the whole group trains
    s = make_splits(info, n_labels=15, n_val=3, seed=0)
    assert s.n_val_labels == 5 and s.n_train_labels == 10 and len(_group_set(s.val)) == 1
    assert not _group_set(s.val) & _group_set(s.labelled)
    # a budget inside one group cannot be split into validation and training
    with pytest.raises(DatasetError, match="without splitting a group"):
        make_splits(info, n_labels=8, n_val=2, seed=0)
    assert make_splits(info, n_labels=8, n_val=0, seed=0).n_train_labels == 8


def test_groups_validation_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"field 'groups' names 1 ids with no image.*ghost"):
        _grouped_info(tmp_path / "a", [2, 2], extra_groups={"ghost": "p9"})
    with pytest.raises(DatasetError, match=r"'groups' disagree: group\(s\) \['patient0'\]"):
        _grouped_info(tmp_path / "b", [2, 2], splits={"train": ["g0_0", "g1_0", "g1_1"],
                                                      "test": ["g0_1"]})
    _grouped_info(tmp_path / "c", [2, 2])
    meta = json.loads((tmp_path / "c" / "dataset.json").read_text())
    for bad, pattern in (([1, 2], r"field 'groups' must be an object"),
                         ({"g0_0": None}, r"field 'groups\.g0_0' must be a non-empty string"),
                         ({"g0_0": ""}, r"field 'groups\.g0_0'")):
        (tmp_path / "c" / "dataset.json").write_text(json.dumps({**meta, "groups": bad}))
        with pytest.raises(DatasetError, match=pattern):
            load_dataset_info(tmp_path / "c")


def test_spacing_per_case(tmp_path: Path) -> None:
    _info_with_ids(tmp_path, 3)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    meta |= {"spacing": [0.5, 0.5], "spacing_per_case": {"c01": [0.2, 0.3]}}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    info = load_dataset_info(tmp_path)
    assert info.spacing_of("c01") == (0.2, 0.3) and info.spacing_of("c00") == (0.5, 0.5)
    assert info.has_spacing
    del meta["spacing"]
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    info = load_dataset_info(tmp_path)
    assert info.spacing_of("c00") is None and info.spacing_of("c01") == (0.2, 0.3)
    assert not info.has_spacing
    for bad, pattern in (({"c01": [0, 1]}, r"'spacing_per_case\.c01' must be two positive"),
                         ({"zz": [1, 1]}, r"'spacing_per_case' names 1 ids .*zz")):
        (tmp_path / "dataset.json").write_text(json.dumps({**meta, "spacing_per_case": bad}))
        with pytest.raises(DatasetError, match=pattern):
            load_dataset_info(tmp_path)
