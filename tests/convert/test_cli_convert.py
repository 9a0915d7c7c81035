"""`tskd convert FORMAT SRC DST [--sequence ...] [--size N]` through tskd.cli.main."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tskd.cli import main
from tskd.data.format import load_dataset_info


def _ph2(root: Path) -> Path:
    case = root / "PH2 Dataset images" / "IMD002"
    (case / "IMD002_Dermoscopic_Image").mkdir(parents=True)
    (case / "IMD002_lesion").mkdir()
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(
        case / "IMD002_Dermoscopic_Image" / "IMD002.bmp")
    lesion = np.zeros((8, 8), np.uint8)
    lesion[:2] = 255  # 16 of 64 pixels
    Image.fromarray(lesion).save(case / "IMD002_lesion" / "IMD002_lesion.bmp")
    return root


def test_cli_convert_prints_summary(tmp_path, capsys):
    src = _ph2(tmp_path / "PH2Dataset")
    assert main(["convert", "ph2", str(src), str(tmp_path / "out"), "--size", "4"]) == 0
    out = capsys.readouterr().out
    assert "converted ph2" in out and "images: 1" in out and "4x4 px" in out
    assert "lesion" in out and "25.000 %" in out
    assert load_dataset_info(tmp_path / "out").case_ids == ("IMD002",)


def test_cli_convert_errors_exit_2_and_leave_no_output(tmp_path, capsys):
    src = _ph2(tmp_path / "PH2Dataset")
    assert main(["convert", "nope", str(src), str(tmp_path / "o1")]) == 2
    assert "invalid value 'nope'" in capsys.readouterr().err
    assert main(["convert", "ph2", str(src), str(tmp_path / "o2"), "--sequence", "T2SPIR"]) == 2
    assert "does not take option" in capsys.readouterr().err
    (src / "PH2 Dataset images" / "IMD002" / "IMD002_lesion" / "IMD002_lesion.bmp").unlink()
    assert main(["convert", "ph2", str(src), str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err
    assert "dataset error" in err and "IMD002_lesion.bmp" in err
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))
