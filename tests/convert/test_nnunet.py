"""tskd.convert.nnunet: nnU-Net v2 raw import, export, and the tskd → nnU-Net → tskd round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tskd.convert import convert
from tskd.data.format import (DatasetError, load_dataset_info, read_case, read_image,
                              write_dataset_json)

H, W = 8, 10


def _rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _labels(seed: int, n: int = 3) -> np.ndarray:
    return np.random.default_rng(100 + seed).integers(0, n, (H, W)).astype(np.uint8)


def make_nnunet(root: Path, *, tr=("a", "b"), ts=("c",), labels_ts=True, rgb_file=False,
                labels=None) -> Path:
    """``root`` = DatasetXXX_Name with 3 channel files per case (or one RGB file)."""
    for sub in ("imagesTr", "labelsTr", "imagesTs") + (("labelsTs",) if labels_ts else ()):
        (root / sub).mkdir(parents=True)
    for part, cases in (("Tr", tr), ("Ts", ts)):
        for i, case in enumerate(cases):
            seed = sum(map(ord, case))
            img = _rgb(seed)
            if rgb_file:
                Image.fromarray(img).save(root / f"images{part}" / f"{case}_0000.png")
            else:
                for c in range(3):
                    Image.fromarray(np.ascontiguousarray(img[..., c])).save(
                        root / f"images{part}" / f"{case}_{c:04d}.png")
            if part == "Tr" or labels_ts:
                Image.fromarray(_labels(seed)).save(root / f"labels{part}" / f"{case}.png")
    meta = {"channel_names": {"0": "R", "1": "G", "2": "B"},
            "labels": labels or {"background": 0, "road": 1, "car": 2},
            "numTraining": len(tr), "file_ending": ".png"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_import_channel_files_labels_and_test_split(tmp_path):
    src = make_nnunet(tmp_path / "Dataset120_Roads")
    summary = convert("nnunet", src, tmp_path / "out")
    info = load_dataset_info(tmp_path / "out")
    assert info.labels == {0: "background", 1: "road", 2: "car"}
    assert info.splits == {"train": ["a", "b"], "test": ["c"]}
    assert info.name == "Roads"
    for case in ("a", "b", "c"):
        image, mask = read_case(info, case)
        seed = sum(map(ord, case))
        assert np.array_equal(image, _rgb(seed))  # channels 0,1,2 -> R,G,B
        assert np.array_equal(mask, _labels(seed).astype(np.int64))
    assert summary.splits == {"train": 2, "test": 1}


def test_import_single_rgb_file_and_unlabelled_test_is_omitted(tmp_path):
    src = make_nnunet(tmp_path / "Dataset121_X", rgb_file=True, labels_ts=False)
    summary = convert("nnunet", src, tmp_path / "out")
    info = load_dataset_info(tmp_path / "out")
    assert info.case_ids == ("a", "b") and info.splits is None
    assert np.array_equal(read_case(info, "a")[0], _rgb(sum(map(ord, "a"))))
    assert any("1 imagesTs cases without labelsTs" in n for n in summary.notes)


def test_import_errors(tmp_path):
    src = make_nnunet(tmp_path / "Dataset122_E")
    (src / "labelsTr" / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"labelsTr/b\.png"):
        convert("nnunet", src, tmp_path / "out")
    src2 = make_nnunet(tmp_path / "Dataset123_R",
                       labels={"background": 0, "whole": [1, 2], "core": 2})
    with pytest.raises(DatasetError, match="region-based"):
        convert("nnunet", src2, tmp_path / "out")
    src3 = make_nnunet(tmp_path / "Dataset124_C")
    (src3 / "imagesTr" / "a_0002.png").unlink()
    with pytest.raises(DatasetError, match=r"a_0002\.png.*channel 2"):
        convert("nnunet", src3, tmp_path / "out")
    src4 = make_nnunet(tmp_path / "Dataset125_N")
    meta = json.loads((src4 / "dataset.json").read_text())
    meta["numTraining"] = 5
    (src4 / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="numTraining"):
        convert("nnunet", src4, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _tskd_dataset(root: Path, grey: bool = False) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    ids = ["case_01", "case_02", "case_03", "case_04"]
    for i, cid in enumerate(ids):
        img = _rgb(i)
        Image.fromarray(img[..., 0] if grey else img).save(root / "images" / f"{cid}.png")
        Image.fromarray(_labels(i)).save(root / "masks" / f"{cid}.png")
    write_dataset_json(root, name="roads", modality="photo",
                       labels={0: "bg", 1: "road", 2: "car"}, spacing=[0.5, 0.25],
                       splits={"train": ids[:3], "test": ids[3:]})
    return root


def test_round_trip_tskd_nnunet_tskd(tmp_path):
    src = _tskd_dataset(tmp_path / "tskd")
    nn = tmp_path / "Dataset007_Roads"
    summary = convert("nnunet-export", src, nn)
    meta = json.loads((nn / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "R", "1": "G", "2": "B"}
    assert meta["labels"] == {"background": 0, "road": 1, "car": 2}
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".png"
    assert sorted(p.name for p in (nn / "imagesTr").iterdir())[:3] == [
        "case_01_0000.png", "case_01_0001.png", "case_01_0002.png"]
    assert sorted(p.name for p in (nn / "labelsTs").iterdir()) == ["case_04.png"]
    # an nnU-Net reader concatenates the channel files: check R, G, B planes independently
    g = np.asarray(Image.open(nn / "imagesTr" / "case_02_0001.png"))
    assert np.array_equal(g, _rgb(1)[..., 1])
    assert np.array_equal(np.asarray(Image.open(nn / "labelsTr" / "case_02.png")), _labels(1))
    assert summary.splits == {"train": 3, "test": 1}

    back = tmp_path / "back"
    convert("nnunet", nn, back)
    a, b = load_dataset_info(src), load_dataset_info(back)
    assert b.labels == a.labels and b.splits == a.splits and b.case_ids == a.case_ids
    assert (b.name, b.modality, b.spacing) == (a.name, a.modality, a.spacing)
    for cid in a.case_ids:
        ia, ma = read_case(a, cid)
        ib, mb = read_case(b, cid)
        assert np.array_equal(ia, ib) and np.array_equal(ma, mb)


def test_export_grey_one_channel_and_bad_name(tmp_path):
    src = _tskd_dataset(tmp_path / "tskd", grey=True)
    nn = tmp_path / "Dataset008_Grey"
    convert("nnunet-export", src, nn)
    meta = json.loads((nn / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "grey"}
    assert sorted(p.name for p in (nn / "imagesTr").iterdir()) == [
        "case_01_0000.png", "case_02_0000.png", "case_03_0000.png"]
    assert np.array_equal(read_image(nn / "imagesTr" / "case_01_0000.png")[..., 0],
                          _rgb(0)[..., 0])
    with pytest.raises(DatasetError, match="DatasetXXX_Name"):
        convert("nnunet-export", src, tmp_path / "Roads")
    assert not (tmp_path / "Roads").exists()
