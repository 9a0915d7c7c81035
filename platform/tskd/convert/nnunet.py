"""nnU-Net v2 raw datasets ↔ tskd (2D natural-image datasets only).

nnU-Net v2 raw layout (``documentation/dataset_format.md`` of nnU-Net v2)::

    DatasetXXX_Name/
      dataset.json     {"channel_names": {"0": "R", "1": "G", "2": "B"},
                        "labels": {"background": 0, "vessel": 1},
                        "numTraining": 20, "file_ending": ".png", ...}
      imagesTr/<case>_0000.png [, <case>_0001.png, ...]    one file per channel
      labelsTr/<case>.png                                    label values 0..C-1
      imagesTs/<case>_0000.png ...                           optional
      labelsTs/<case>.png                                    optional (not part of the standard)

nnU-Net's ``NaturalImage2DIO`` (``.png``, ``.bmp``, ``.tif``) reads an RGB file as three
channels and concatenates the files of a case, so an RGB dataset is either one RGB ``_0000``
file with three channel names, or three grey files ``_0000.._0002``.

Import (``nnunet``): one channel (grey or an RGB file) or three grey channel files, combined into
RGB in channel order; labels inverted to value → name (region-based labels and an ``ignore``
label are rejected); ``imagesTr`` → the ``train`` split; ``imagesTs`` cases **with** labels in
``labelsTs`` → the ``test`` split. ``imagesTs`` without a ``labelsTs`` folder is **omitted** (a
note in the summary; tskd needs a mask for every image); with ``labelsTs`` present, a test image
without its label is an error. Without labelled test cases no split is declared.

Export (``nnunet-export``): ``SRC`` a tskd dataset, ``DST`` a folder named
``DatasetXXX_Name``. RGB images become three grey channel files ``_0000.._0002``
(``channel_names`` R, G, B); datasets whose images are all grey get one channel. Masks are written
as value PNGs. The ``test`` split goes to ``imagesTs``/``labelsTs``, everything else to
``imagesTr``/``labelsTr``. Label 0 is named ``background`` (nnU-Net requires it). tskd's name,
modality, spacing and original label names are kept under the extra key ``"tskd"`` (nnU-Net ignores
unknown keys), which the importer reads back; ``fov/`` masks are not exported.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tskd.convert.common import (ConversionSummary, DatasetWriter, atomic_directory,
                                 check_destination, natural_key, source_dir)
from tskd.data.format import (DatasetError, read_case, read_image, read_mask,
                              validate_dataset)

SUPPORTED_ENDINGS = (".png", ".bmp", ".tif", ".tiff")
_DATASET_NAME = re.compile(r"^Dataset(\d{3})_(.+)$")
RGB_CHANNELS = {"0": "R", "1": "G", "2": "B"}


# ----------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(f"{path}: nnU-Net dataset.json is missing")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: top level must be an object")
    return meta


def parse_labels(raw: Any, where: Path) -> dict[int, str]:
    """nnU-Net ``labels`` (name → int) → tskd labels (int → name), checked 0..C-1."""
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{where}: field 'labels' must be a non-empty object name -> value")
    out: dict[int, str] = {}
    for name, value in raw.items():
        if isinstance(value, (list, tuple)):
            raise DatasetError(f"{where}: label {name!r} is region-based ({value}); only plain "
                               f"integer labels can be imported")
        if not isinstance(value, int) or isinstance(value, bool):
            raise DatasetError(f"{where}: label {name!r} has non-integer value {value!r}")
        if name == "ignore":
            raise DatasetError(f"{where}: an 'ignore' label ({value}) is not supported by tskd")
        if value in out:
            raise DatasetError(f"{where}: labels {out[value]!r} and {name!r} share value {value}")
        out[value] = str(name)
    values = sorted(out)
    if values != list(range(len(values))) or len(values) < 2:
        raise DatasetError(f"{where}: labels must be 0..C-1 with a background 0 and at least one "
                           f"foreground label; got values {values}")
    return {v: out[v] for v in values}


def _group_channels(folder: Path, ending: str, n_channels: int) -> dict[str, list[Path]]:
    """case id → its channel files in order; errors on missing or extra channels."""
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + r"$")
    files: dict[str, dict[int, Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        m = pattern.match(p.name)
        if m is None:
            if p.name.endswith(ending):
                raise DatasetError(f"{p}: image name must be <case>_XXXX{ending} (channel "
                                   f"index XXXX)")
            continue
        files.setdefault(m.group(1), {})[int(m.group(2))] = p
    cases: dict[str, list[Path]] = {}
    for case, chans in sorted(files.items(), key=lambda kv: natural_key(kv[0])):
        if n_channels == 3 and set(chans) == {0}:  # one RGB file holds the three channels
            cases[case] = [chans[0]]
            continue
        for c in range(n_channels):
            if c not in chans:
                raise DatasetError(f"{folder / f'{case}_{c:04d}{ending}'}: channel {c} of case "
                                   f"{case!r} is missing ({n_channels} channel(s) declared)")
        extra = sorted(set(chans) - set(range(n_channels)))
        if extra:
            raise DatasetError(f"{chans[extra[0]]}: channel {extra[0]} of case {case!r} is not "
                               f"declared in channel_names ({n_channels} channel(s))")
        cases[case] = [chans[c] for c in range(n_channels)]
    return cases


def _read_channels(paths: list[Path]) -> np.ndarray:
    """A case's channel files → RGB uint8 (H, W, 3) (one file: grey or RGB; three: grey each)."""
    if len(paths) == 1:
        return read_image(paths[0])
    planes = []
    for p in paths:
        rgb = read_image(p)
        if not (np.array_equal(rgb[..., 0], rgb[..., 1])
                and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise DatasetError(f"{p}: expected a single-channel image (one file per channel), "
                               f"found colour")
        planes.append(rgb[..., 0])
        if planes[-1].shape != planes[0].shape:
            raise DatasetError(f"{p}: channel size {planes[-1].shape[1]}x{planes[-1].shape[0]} "
                               f"differs from {paths[0].name}")
    return np.stack(planes, axis=2)


def convert_nnunet(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                   size: int | None = None) -> ConversionSummary:
    """Import an nnU-Net v2 raw 2D dataset ``src`` (DatasetXXX_Name) into tskd at ``dst``."""
    src = source_dir(src)
    json_path = src / "dataset.json"
    meta = _load_json(json_path)
    if "channel_names" not in meta:
        hint = " (this looks like nnU-Net v1: 'modality')" if "modality" in meta else ""
        raise DatasetError(f"{json_path}: field 'channel_names' is missing{hint}; only nnU-Net "
                           f"v2 datasets are supported")
    channels = meta["channel_names"]
    if not isinstance(channels, dict) or len(channels) not in (1, 3):
        raise DatasetError(f"{json_path}: field 'channel_names' must declare 1 (grey or RGB "
                           f"file) or 3 channels, got {channels!r}")
    ending = meta.get("file_ending")
    if not isinstance(ending, str) or ending.lower() not in SUPPORTED_ENDINGS:
        raise DatasetError(f"{json_path}: field 'file_ending' is {ending!r}; only 2D natural "
                           f"images are supported ({', '.join(SUPPORTED_ENDINGS)})")
    labels = parse_labels(meta.get("labels"), json_path)
    tskd_meta = meta.get("tskd") if isinstance(meta.get("tskd"), dict) else {}
    if isinstance(tskd_meta.get("labels"), dict):  # original names, if they survived unchanged
        names = {int(k): str(v) for k, v in tskd_meta["labels"].items()}
        if sorted(names) == sorted(labels):
            labels = {v: names[v] for v in sorted(labels)}
    n_channels = len(channels)

    images_tr = src / "imagesTr"
    if not images_tr.is_dir():
        raise DatasetError(f"{images_tr}: directory is missing")
    tr = _group_channels(images_tr, ending, n_channels)
    if not tr:
        raise DatasetError(f"{images_tr}: no training images (<case>_0000{ending}); empty "
                           f"source")
    n_training = meta.get("numTraining")
    if n_training is not None and n_training != len(tr):
        raise DatasetError(f"{json_path}: numTraining is {n_training} but {images_tr} holds "
                           f"{len(tr)} cases")
    ts: dict[str, list[Path]] = {}
    images_ts, labels_ts = src / "imagesTs", src / "labelsTs"
    omitted = 0
    if images_ts.is_dir():
        found = _group_channels(images_ts, ending, n_channels)
        if labels_ts.is_dir():
            ts = found
        else:
            omitted = len(found)

    m = _DATASET_NAME.match(src.name)
    name = tskd_meta.get("name") or meta.get("name") or (m.group(2) if m else src.name)
    modality = tskd_meta.get("modality") or "unknown"
    spacing = tskd_meta.get("spacing")
    with DatasetWriter(dst, fmt="nnunet", src=src, size=size) as out:
        splits: dict[str, list[str]] = {"train": [], "test": []}
        for split, cases, label_dir in (("train", tr, src / "labelsTr"), ("test", ts, labels_ts)):
            for case, paths in cases.items():
                label_path = label_dir / f"{case}{ending}"
                if not label_path.is_file():
                    raise DatasetError(f"{label_path}: label of case {case!r} is missing")
                image = _read_channels(paths)
                mask = read_mask(label_path, labels)
                if mask.shape != image.shape[:2]:
                    raise DatasetError(f"{label_path}: label size {mask.shape[1]}x"
                                       f"{mask.shape[0]} differs from image size "
                                       f"{image.shape[1]}x{image.shape[0]}")
                out.add(case, image, mask)
                splits[split].append(case)
        if omitted:
            out.note(f"{omitted} imagesTs cases without labelsTs/ omitted (tskd needs a mask "
                     f"for every image)")
        if spacing is not None and out.size is not None:
            spacing = None
            out.note("resized: the original spacing no longer applies; none declared")
        declared = splits if splits["test"] else None
        return out.finish(name=str(name), modality=str(modality), labels=labels,
                          spacing=spacing, splits=declared)


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def export_nnunet(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                  size: int | None = None) -> ConversionSummary:
    """Export the tskd dataset ``src`` as an nnU-Net v2 raw dataset at ``dst``."""
    if size is not None:
        raise DatasetError("size: nnunet-export writes images at their own size; resize when "
                           "importing instead")
    src = Path(src).expanduser()
    dst = check_destination(dst)
    if not _DATASET_NAME.match(dst.name):
        raise DatasetError(f"{dst}: nnU-Net v2 dataset folders must be named DatasetXXX_Name "
                           f"(three digits), e.g. Dataset101_{dst.name or 'Name'}")
    info = validate_dataset(src)
    if info.num_classes > 256:
        raise DatasetError(f"{src}: {info.num_classes} labels do not fit 8-bit label PNGs")
    names = [("background" if v == 0 else info.labels[v]) for v in sorted(info.labels)]
    if len(set(names)) != len(names):
        raise DatasetError(f"{src / 'dataset.json'}: label names must be unique to become "
                           f"nnU-Net label keys; got {names}")
    test = set((info.splits or {}).get("test", ()))
    cases = [(c, "Ts" if c in test else "Tr") for c in info.case_ids]
    # one pass to decide grey vs RGB (all images must agree on the channel count in nnU-Net)
    grey = all(_is_grey(read_image(info.images[c])) for c, _ in cases)
    counts = np.zeros(info.num_classes, np.int64)
    with atomic_directory(dst) as root:
        for sub in ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if test else ()):
            (root / sub).mkdir()
        for case, part in cases:
            image, mask = read_case(info, case)
            if grey:
                Image.fromarray(image[..., 0]).save(root / f"images{part}" / f"{case}_0000.png")
            else:
                for c in range(3):
                    Image.fromarray(np.ascontiguousarray(image[..., c])).save(
                        root / f"images{part}" / f"{case}_{c:04d}.png")
            Image.fromarray(mask.astype(np.uint8)).save(root / f"labels{part}" / f"{case}.png")
            counts += np.bincount(mask.ravel(), minlength=info.num_classes)
        n_train = sum(1 for _, p in cases if p == "Tr")
        if n_train == 0:
            raise DatasetError(f"{src}: every case is in the test split; nnU-Net needs training "
                               f"cases in imagesTr")
        meta = {"channel_names": {"0": "grey"} if grey else dict(RGB_CHANNELS),
                "labels": {n: v for v, n in enumerate(names)},
                "numTraining": n_train,
                "file_ending": ".png",
                "name": info.name,
                "description": f"exported from the tskd dataset {info.name!r}",
                "tskd": {"name": info.name, "modality": info.modality,
                         "spacing": None if info.spacing is None else list(info.spacing),
                         "labels": {str(k): v for k, v in info.labels.items()}}}
        (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        total = int(counts.sum())
        summary = ConversionSummary(
            format="nnunet-export", src=src, dst=dst, name=info.name, modality=info.modality,
            n_images=len(cases), classes=dict(info.labels),
            pixel_share={info.labels[v]: (float(counts[v]) / total if total else 0.0)
                         for v in sorted(info.labels)},
            splits={"train": n_train, "test": len(cases) - n_train} if test else None,
            spacing=info.spacing, size=None,
            notes=tuple(n for n in (
                f"channels: {'1 (grey)' if grey else '3 files per case (R, G, B)'}",
                "fov/ masks are not exported (nnU-Net has no field-of-view)" if info.has_fov
                else None,
                "only the 'test' split is kept (as imagesTs/labelsTs); other splits merged into "
                "imagesTr" if set(info.splits or ()) - {"train", "test"} else None) if n))
    return summary


def _is_grey(rgb: np.ndarray) -> bool:
    return bool(np.array_equal(rgb[..., 0], rgb[..., 1])
                and np.array_equal(rgb[..., 0], rgb[..., 2]))
