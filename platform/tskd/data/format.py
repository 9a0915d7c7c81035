"""The tskd dataset format (in the spirit of nnU-Net), its reader, validator and splits.

A dataset is a directory::

    <root>/dataset.json     {"name", "modality", "labels": {"0": "background", ...},
                             "spacing": [sy, sx] (optional, mm per pixel),
                             "spacing_per_case": {id: [sy, sx]} (optional, overrides
                                                 "spacing" for the cases it names),
                             "groups": {id: group} (optional, e.g. patient ids: a group
                                       never straddles test / val / labelled),
                             "splits": {"train": [ids], "test": [ids]} (optional)}
    <root>/images/<id>.<ext>    PNG/JPEG/TIFF/BMP, read as RGB uint8 (H, W, 3)
    <root>/masks/<id>.<ext>     label image, values 0..C-1 (or 0/255 when C == 2)
    <root>/fov/<id>.<ext>       optional field-of-view mask, nonzero = inside

A case id is the file stem; image and mask extensions may differ. Every problem is reported as a
:class:`DatasetError` whose message names the offending file or ``dataset.json`` field::

    >>> info = validate_dataset("runs/demo/data", n_labels=40)             # doctest: +SKIP
    >>> splits = make_splits(info, n_labels=40, n_val=8, seed=0)           # doctest: +SKIP
    >>> splits.n_train_labels, splits.n_val_labels                         # doctest: +SKIP
    (32, 8)
    >>> image, mask = read_case(info, splits.labelled[0])                  # doctest: +SKIP
    >>> image.shape, image.dtype, mask.dtype                               # doctest: +SKIP
    ((128, 128, 3), dtype('uint8'), dtype('int64'))
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
"""Readable file extensions (compared case-insensitively)."""
DATASET_JSON = "dataset.json"
_MAX_REPORTED_PROBLEMS = 20


class DatasetError(ValueError):
    """A dataset is malformed; the message names the offending file or ``dataset.json`` field."""


@dataclass(frozen=True)
class DatasetInfo:
    """A parsed dataset directory (see the module docstring for the layout).

    ``labels`` maps each label value ``0..C-1`` to its name (0 is background); ``case_ids`` is
    sorted; ``splits`` is ``dataset.json``'s ``splits`` (ids sorted) or ``None``. ``images``,
    ``masks`` and ``fov`` map case ids to files (``fov`` is ``None`` without a ``fov/`` directory).
    ``groups`` maps case ids to group ids (``None`` when undeclared; an unlisted case is its own
    group, see :meth:`group_of`); ``spacing_per_case`` maps case ids to their own (sy, sx)
    (``None`` when undeclared, see :meth:`spacing_of`).
    """

    root: Path
    name: str
    modality: str
    labels: dict[int, str]
    spacing: tuple[float, float] | None
    splits: dict[str, list[str]] | None
    case_ids: tuple[str, ...]
    images: dict[str, Path] = field(default_factory=dict, repr=False, compare=False)
    masks: dict[str, Path] = field(default_factory=dict, repr=False, compare=False)
    fov: dict[str, Path] | None = field(default=None, repr=False, compare=False)
    groups: dict[str, str] | None = field(default=None, repr=False, compare=False)
    spacing_per_case: dict[str, tuple[float, float]] | None = field(default=None, repr=False,
                                                                    compare=False)

    def spacing_of(self, case_id: str) -> tuple[float, float] | None:
        """Pixel spacing (sy, sx) in mm of one case: its ``spacing_per_case`` entry, else the
        dataset-wide ``spacing``, else ``None`` (distances are then in pixels)."""
        if self.spacing_per_case is not None and case_id in self.spacing_per_case:
            return self.spacing_per_case[case_id]
        return self.spacing

    @property
    def has_spacing(self) -> bool:
        """Whether every case has a spacing in mm (so HD95 is in mm for all of them)."""
        if self.spacing is not None:
            return True
        return self.spacing_per_case is not None and \
            all(c in self.spacing_per_case for c in self.case_ids)

    def group_of(self, case_id: str) -> str:
        """The case's group (``groups`` entry; a case without one is its own group)."""
        if self.groups is not None and case_id in self.groups:
            return self.groups[case_id]
        return f"\0{case_id}"  # cannot collide with a declared group id

    @property
    def num_classes(self) -> int:
        """``C``: number of labels including background."""
        return len(self.labels)

    @property
    def class_names(self) -> list[str]:
        """Label names ordered by label value (index ``c`` names class ``c``)."""
        return [self.labels[c] for c in sorted(self.labels)]

    @property
    def has_fov(self) -> bool:
        """Whether the dataset has field-of-view masks (``fov/``)."""
        return self.fov is not None

    def __hash__(self) -> int:
        return hash((self.root, self.name, self.case_ids))

    def __repr__(self) -> str:
        splits = None if self.splits is None else {k: len(v) for k, v in self.splits.items()}
        return (f"DatasetInfo(root={str(self.root)!r}, name={self.name!r}, "
                f"modality={self.modality!r}, labels={self.labels}, spacing={self.spacing}, "
                f"splits={splits} (sizes), {len(self.case_ids)} cases, fov={self.has_fov})")


@dataclass(frozen=True)
class Splits:
    """Case ids per role; all four are disjoint and sorted.

    The label budget is ``labelled`` + ``val``: ``labelled`` are the images trained on, ``val``
    the validation images for model selection, carved from inside the budget (empty when model
    selection is off). ``test`` is the test split, ``unlabelled`` the remaining train ids (their
    labels are never used). No group of the dataset is split between ``test``, ``val`` and
    ``labelled``.
    """

    labelled: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    unlabelled: tuple[str, ...]

    @property
    def n_train_labels(self) -> int:
        """Labelled images used for training (``len(labelled)``)."""
        return len(self.labelled)

    @property
    def n_val_labels(self) -> int:
        """Labelled images used for validation / model selection (``len(val)``)."""
        return len(self.val)

    @property
    def n_labels_used(self) -> int:
        """All labelled images the method used: training + validation (= the budget)."""
        return len(self.labelled) + len(self.val)

    @property
    def train(self) -> tuple[str, ...]:
        """Alias of ``labelled`` (the labelled training ids)."""
        return self.labelled


# ----------------------------------------------------------------------------------------------
# dataset.json
# ----------------------------------------------------------------------------------------------


def _parse_labels(raw: Any, where: str) -> dict[int, str]:
    """``{"0": "background", "1": "organ"}`` (or int keys) → ``{0: "background", 1: "organ"}``."""
    if not isinstance(raw, Mapping) or not raw:
        raise DatasetError(f"{where}: field 'labels' must be a non-empty object mapping label "
                           f"values to names, got {raw!r}")
    labels: dict[int, str] = {}
    for key, name in raw.items():
        try:
            value = int(key)
            if isinstance(key, float) or (isinstance(key, str) and str(value) != key.strip()):
                raise ValueError
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: field 'labels' has key {key!r}, which is not an "
                               f"integer label value") from None
        if value in labels:
            raise DatasetError(f"{where}: field 'labels' declares value {value} twice")
        if not isinstance(name, str) or not name:
            raise DatasetError(f"{where}: field 'labels.{key}' must be a non-empty string, "
                               f"got {name!r}")
        labels[value] = name
    values = sorted(labels)
    if 0 not in labels:
        raise DatasetError(f"{where}: field 'labels' must declare 0 (background); got values "
                           f"{values}")
    if values != list(range(len(values))):
        raise DatasetError(f"{where}: field 'labels' must be contiguous 0..C-1; got values "
                           f"{values}")
    if len(values) < 2:
        raise DatasetError(f"{where}: field 'labels' declares only background; at least one "
                           f"foreground label is needed")
    return {v: labels[v] for v in values}


def _parse_spacing(raw: Any, where: str) -> tuple[float, float] | None:
    if raw is None:
        return None
    ok = (isinstance(raw, Sequence) and not isinstance(raw, str) and len(raw) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw))
    if not ok or not all(math.isfinite(v) and v > 0 for v in raw):
        raise DatasetError(f"{where}: field 'spacing' must be two positive numbers [sy, sx] "
                           f"(mm per pixel), got {raw!r}")
    return float(raw[0]), float(raw[1])


def _parse_spacing_per_case(raw: Any, where: str) -> dict[str, tuple[float, float]] | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise DatasetError(f"{where}: field 'spacing_per_case' must be an object mapping case "
                           f"ids to [sy, sx], got {type(raw).__name__}")
    out: dict[str, tuple[float, float]] = {}
    for case_id, value in raw.items():
        try:
            sp = _parse_spacing(value, where)
        except DatasetError:
            raise DatasetError(f"{where}: field 'spacing_per_case.{case_id}' must be two "
                               f"positive numbers [sy, sx] (mm per pixel), got {value!r}") \
                from None
        assert sp is not None
        out[str(case_id)] = sp
    return out


def _parse_groups(raw: Any, where: str) -> dict[str, str] | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise DatasetError(f"{where}: field 'groups' must be an object mapping case ids to "
                           f"group ids (e.g. patient ids), got {type(raw).__name__}")
    groups: dict[str, str] = {}
    for case_id, group in raw.items():
        if isinstance(group, bool) or not isinstance(group, (str, int)) or group == "":
            raise DatasetError(f"{where}: field 'groups.{case_id}' must be a non-empty string "
                               f"(or integer) group id, got {group!r}")
        groups[str(case_id)] = str(group)
    return groups


def _parse_splits(raw: Any, where: str) -> dict[str, list[str]] | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise DatasetError(f"{where}: field 'splits' must be an object like "
                           f"{{\"train\": [ids], \"test\": [ids]}}, got {type(raw).__name__}")
    splits: dict[str, list[str]] = {}
    for name, ids in raw.items():
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise DatasetError(f"{where}: field 'splits.{name}' must be a list of case id "
                               f"strings")
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise DatasetError(f"{where}: field 'splits.{name}' lists ids more than once: "
                               f"{dup[:10]}")
        splits[str(name)] = sorted(ids)
    if "train" in splits and "test" in splits:
        both = sorted(set(splits["train"]) & set(splits["test"]))
        if both:
            raise DatasetError(f"{where}: fields 'splits.train' and 'splits.test' share "
                               f"{len(both)} ids, e.g. {both[:5]}")
    return splits


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(f"{path}: missing (every dataset needs a dataset.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column "
                           f"{e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


def _list_cases(directory: Path) -> dict[str, Path]:
    """Map stem → file for readable image files in ``directory`` (hidden files ignored)."""
    cases: dict[str, Path] = {}
    skipped = []
    for p in sorted(directory.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append(p.name)
            continue
        if p.stem in cases:
            raise DatasetError(f"{p}: case id {p.stem!r} has two files, {cases[p.stem].name} "
                               f"and {p.name}")
        cases[p.stem] = p
    if skipped:
        logger.warning("%s: ignoring %d files without an image extension %s, e.g. %s",
                       directory, len(skipped), IMAGE_EXTENSIONS, skipped[:3])
    return cases


def _pair(left: dict[str, Path], right: dict[str, Path], right_dir: Path, what: str) -> None:
    for case_id, path in left.items():
        if case_id not in right:
            raise DatasetError(f"{path}: no matching {what} {right_dir}/{case_id}.<ext>")


def load_dataset_info(root: str | os.PathLike[str]) -> DatasetInfo:
    """Parse ``<root>/dataset.json`` and pair image, mask (and fov) files by case id.

    Reads no pixels (see :func:`validate_dataset`). Raises :class:`DatasetError` on bad JSON,
    missing or malformed fields, labels that are not ``0..C-1`` with 0 present, bad spacing,
    splits naming unknown ids, an image without mask, a mask without image, or no images.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset directory does not exist")
    json_path = root / DATASET_JSON
    meta = _read_json(json_path)
    for key in ("name", "modality"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            raise DatasetError(f"{json_path}: field {key!r} is missing or not a non-empty "
                               f"string")
    if "labels" not in meta:
        raise DatasetError(f"{json_path}: field 'labels' is missing")
    labels = _parse_labels(meta["labels"], str(json_path))
    spacing = _parse_spacing(meta.get("spacing"), str(json_path))
    splits = _parse_splits(meta.get("splits"), str(json_path))
    groups = _parse_groups(meta.get("groups"), str(json_path))
    spacing_per_case = _parse_spacing_per_case(meta.get("spacing_per_case"), str(json_path))

    images_dir, masks_dir, fov_dir = root / "images", root / "masks", root / "fov"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise DatasetError(f"{d}: directory is missing")
    images = _list_cases(images_dir)
    if not images:
        raise DatasetError(f"{images_dir}: no images (extensions {', '.join(IMAGE_EXTENSIONS)})")
    masks = _list_cases(masks_dir)
    _pair(images, masks, masks_dir, "mask")
    _pair(masks, images, images_dir, "image")
    fov: dict[str, Path] | None = None
    if fov_dir.is_dir():
        fov = _list_cases(fov_dir)
        _pair(images, fov, fov_dir, "field-of-view mask")
        _pair(fov, images, images_dir, "image")

    case_ids = tuple(sorted(images))
    if splits is not None:
        known = set(case_ids)
        for name, ids in splits.items():
            unknown = [i for i in ids if i not in known]
            if unknown:
                raise DatasetError(f"{json_path}: field 'splits.{name}' names {len(unknown)} "
                                   f"ids with no image in {images_dir}, e.g. {unknown[:5]}")
    known = set(case_ids)
    for fld, mapping in (("groups", groups), ("spacing_per_case", spacing_per_case)):
        unknown = sorted(set(mapping or ()) - known)
        if unknown:
            raise DatasetError(f"{json_path}: field '{fld}' names {len(unknown)} ids with no "
                               f"image in {images_dir}, e.g. {unknown[:5]}")
    info = DatasetInfo(root=root, name=meta["name"], modality=meta["modality"], labels=labels,
                       spacing=spacing, splits=splits, case_ids=case_ids, images=images,
                       masks=masks, fov=fov, groups=groups, spacing_per_case=spacing_per_case)
    if splits is not None and groups is not None and "test" in splits:
        train = splits.get("train") or [i for i in case_ids if i not in set(splits["test"])]
        test_groups = {info.group_of(i) for i in splits["test"]}
        both = sorted({groups[i] for i in train if info.group_of(i) in test_groups})
        if both:
            raise DatasetError(f"{json_path}: fields 'splits' and 'groups' disagree: group(s) "
                               f"{both[:5]} have cases in both the train and the test split; "
                               f"a group (e.g. a patient) must lie on one side")
    return info


def write_dataset_json(root: str | os.PathLike[str], *, name: str, modality: str,
                       labels: Mapping[int, str], spacing: Sequence[float] | None = None,
                       splits: Mapping[str, Sequence[str]] | None = None,
                       groups: Mapping[str, str] | None = None,
                       spacing_per_case: Mapping[str, Sequence[float]] | None = None,
                       extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``<root>/dataset.json`` atomically and return its path.

    ``labels``, ``spacing``, ``groups`` and ``spacing_per_case`` are checked like
    :func:`load_dataset_info` does; ``extra`` adds more top-level fields (e.g. the demo's
    ``"generator"``).
    """
    root = Path(root)
    path = root / DATASET_JSON
    parsed = _parse_labels(dict(labels), str(path))
    meta: dict[str, Any] = {"name": name, "modality": modality,
                            "labels": {str(k): v for k, v in parsed.items()}}
    if spacing is not None:
        meta["spacing"] = list(_parse_spacing(list(spacing), str(path)) or ())
    if spacing_per_case is not None:
        parsed_sp = _parse_spacing_per_case(
            {k: list(v) for k, v in spacing_per_case.items()}, str(path)) or {}
        meta["spacing_per_case"] = {k: list(v) for k, v in parsed_sp.items()}
    if groups is not None:
        meta["groups"] = _parse_groups(dict(groups), str(path))
    if splits is not None:
        meta["splits"] = {k: list(v) for k, v in splits.items()}
    for key, value in (extra or {}).items():
        if key in meta:
            raise DatasetError(f"{path}: extra field {key!r} collides with a standard field")
        meta[key] = value
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".dataset.json.", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------------------------
# Pixels
# ----------------------------------------------------------------------------------------------


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: unreadable or corrupt image ({type(e).__name__}: {e})") \
            from None
    return img


def _rescale_to_uint8(a: np.ndarray) -> np.ndarray:
    """Min-max rescale a high-bit-depth grey array to uint8 (a constant image becomes 0)."""
    a = a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.round((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image as RGB ``uint8 (H, W, 3)``.

    Grey is replicated to 3 channels, alpha is dropped, palettes are expanded, and 16-bit/32-bit/
    float grey is min-max rescaled per image to 0..255.
    """
    path = Path(path)
    img = _open(path)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        grey = _rescale_to_uint8(np.asarray(img))
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode in ("1", "L", "LA", "La"):
        grey = np.asarray(img.convert("L"), dtype=np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


def _mask_values(path: Path) -> np.ndarray:
    """Raw label values of a mask file as int64 (H, W) (palette images give their indices)."""
    img = _open(path)
    if img.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LA", "La", "PA"):
        a = np.asarray(img)
        if img.mode in ("LA", "La", "PA"):
            return a[..., 0].astype(np.int64)
        if img.mode in ("CMYK", "YCbCr"):
            a = np.asarray(img.convert("RGB"))
        a = a[..., :3]
        if not (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])):
            raise DatasetError(f"{path}: colour mask (channels differ); masks must be "
                               f"single-channel label images")
        return a[..., 0].astype(np.int64)
    a = np.asarray(img)
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            raise DatasetError(f"{path}: mask has non-integer values")
    return a.astype(np.int64)


def read_mask(path: str | os.PathLike[str], labels: Mapping[int, str] | int) -> np.ndarray:
    """Read a label mask as ``int64 (H, W)`` with values in ``0..C-1``.

    ``labels`` is the dataset's label dict (or ``C``). Binary 0/255 masks become 0/1 only when
    ``C == 2``. Values outside ``0..C-1`` raise :class:`DatasetError` naming them.
    """
    path = Path(path)
    n = labels if isinstance(labels, int) else len(labels)
    mask = _mask_values(path)
    values = np.unique(mask)
    if n == 2 and values.size and values.max() == 255 and np.isin(values, (0, 255)).all():
        mask = (mask == 255).astype(np.int64)
        values = np.unique(mask)
    bad = values[(values < 0) | (values >= n)]
    if bad.size:
        raise DatasetError(f"{path}: mask has undeclared label values {bad[:20].tolist()} "
                           f"(declared: 0..{n - 1})")
    return mask


def _case_path(mapping: Mapping[str, Path], case_id: str, info: DatasetInfo) -> Path:
    try:
        return mapping[case_id]
    except KeyError:
        raise DatasetError(f"{info.root}: unknown case id {case_id!r}") from None


def read_case(info: DatasetInfo, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Image ``uint8 (H, W, 3)`` and mask ``int64 (H, W)`` of one case (sizes checked)."""
    image = read_image(_case_path(info.images, case_id, info))
    mask_path = _case_path(info.masks, case_id, info)
    mask = read_mask(mask_path, info.labels)
    if mask.shape != image.shape[:2]:
        raise DatasetError(f"{mask_path}: mask size {_wh(mask)} differs from image size "
                           f"{_wh(image)} of {info.images[case_id]}")
    return image, mask


def read_fov(info: DatasetInfo, case_id: str) -> np.ndarray | None:
    """Field-of-view mask ``bool (H, W)`` (True = inside), or ``None`` without ``fov/``."""
    if info.fov is None:
        return None
    path = _case_path(info.fov, case_id, info)
    img = _open(path)
    a = np.asarray(img)
    if a.ndim == 3:
        a = a[..., :3] if img.mode in ("RGB", "RGBA") else a[..., :1]
        return np.any(a != 0, axis=2)
    return a != 0


def _wh(a: np.ndarray) -> str:
    return f"{a.shape[1]}x{a.shape[0]}"


# ----------------------------------------------------------------------------------------------
# Validation and splits
# ----------------------------------------------------------------------------------------------


def _n_test(n: int, test_fraction: float) -> int:
    return min(n - 1, max(1, round(test_fraction * n))) if n > 1 else 0


def _grouped(info: DatasetInfo, ids: Sequence[str]) -> list[list[str]]:
    """``ids`` bundled by group, groups in the order of their first id, ids in given order."""
    bundles: dict[str, list[str]] = {}
    for i in ids:
        bundles.setdefault(info.group_of(i), []).append(i)
    return list(bundles.values())


def _train_pool(info: DatasetInfo, seed: int, test_fraction: float
                ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train ids, test ids) before val/label carving."""
    ids = info.case_ids
    splits = info.splits or {}
    if "test" in splits:
        test = tuple(sorted(splits["test"]))
        if "train" in splits:
            train = tuple(sorted(splits["train"]))
        else:
            held = set(test)
            train = tuple(i for i in ids if i not in held)
        return train, test
    pool = tuple(sorted(splits.get("train", ids)))
    if "train" in splits:
        rest = tuple(i for i in ids if i not in set(pool))
        if rest:  # declared train split only: the other ids are the test split
            return pool, rest
    if not 0.0 <= test_fraction < 1.0:
        raise DatasetError(f"test_fraction must be in [0, 1), got {test_fraction}")
    n_test = _n_test(len(pool), test_fraction) if test_fraction > 0 else 0
    groups = _grouped(info, pool)
    perm = np.random.default_rng([seed, 0x7E57]).permutation(len(groups))
    test_set: set[str] = set()
    for j in perm[:-1]:  # whole groups until n_test images; at least one group stays for train
        if len(test_set) >= n_test:
            break
        test_set.update(groups[j])
    return tuple(i for i in pool if i not in test_set), tuple(sorted(test_set))


def validate_dataset(root: str | os.PathLike[str], *, n_labels: int | None = None,
                     n_val: int = 0, test_fraction: float = 0.2, seed: int = 0
                     ) -> DatasetInfo:
    """Fully validate a dataset before any training; return its :class:`DatasetInfo`.

    Besides :func:`load_dataset_info`'s checks: every image, mask and fov file is readable, each
    mask (and fov) has its image's size, mask values are declared labels, no split listed in
    ``dataset.json`` is empty, and (when ``n_labels`` is given) the train split holds at least
    ``n_labels`` images (after holding out ``test_fraction`` as :func:`make_splits` does when
    ``dataset.json`` declares no test split) and ``n_val < n_labels`` (validation is carved from
    inside the budget). ``seed`` is :func:`make_splits`' (the test split of a grouped dataset
    depends on it). All pixel problems are collected into one :class:`DatasetError`.
    """
    info = load_dataset_info(root)
    json_path = info.root / DATASET_JSON
    for name, ids in (info.splits or {}).items():
        if not ids:
            raise DatasetError(f"{json_path}: field 'splits.{name}' is empty")
    problems: list[str] = []
    for case_id in info.case_ids:
        try:
            image, _ = read_case(info, case_id)
            fov = read_fov(info, case_id)
            if info.fov is not None and fov is not None and fov.shape != image.shape[:2]:
                raise DatasetError(f"{info.fov[case_id]}: field-of-view size {_wh(fov)} "
                                   f"differs from image size {_wh(image)} of "
                                   f"{info.images[case_id]}")
        except DatasetError as e:
            problems.append(str(e))
    if problems:
        shown = problems[:_MAX_REPORTED_PROBLEMS]
        more = len(problems) - len(shown)
        raise DatasetError(f"{info.root}: {len(problems)} invalid case(s):\n  "
                           + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else ""))
    if n_labels is not None:
        train, test = _train_pool(info, seed, test_fraction)  # seed matters with groups only
        if len(train) < n_labels:
            raise DatasetError(f"{info.root}: too few training images: the train split has "
                               f"{len(train)} (of {len(info.case_ids)}, {len(test)} held out "
                               f"for test) but the label budget is n_labels={n_labels}")
        _check_counts(n_labels, n_val)
    logger.info("dataset %s (%s): %d cases, %d classes %s", info.name, info.root,
                len(info.case_ids), info.num_classes, info.class_names)
    return info


def _check_counts(n_labels: int, n_val: int) -> None:
    if n_labels < 1:
        raise DatasetError(f"n_labels must be >= 1, got {n_labels}")
    if n_val < 0:
        raise DatasetError(f"n_val must be >= 0, got {n_val}")
    if n_val and n_val >= n_labels:
        raise DatasetError(f"n_val={n_val} validation images are carved from inside the label "
                           f"budget n_labels={n_labels}, so n_val must be < n_labels")


def _carve_val(budget_groups: list[list[str]], n_val: int, n_labels: int) -> list[str]:
    """Whole groups of the budget (in budget order) whose images fit within ``n_val``; if no
    group fits, the budget's smallest group, when labelled images remain besides it."""
    val: list[str] = []
    for g in budget_groups:
        if len(val) == n_val:
            break
        if len(val) + len(g) <= n_val:
            val.extend(g)
    if not val and n_val:
        smallest = min(budget_groups, key=len)
        if len(smallest) >= n_labels:
            raise DatasetError(
                f"cannot carve n_val={n_val} validation images from the label budget "
                f"n_labels={n_labels} without splitting a group (the budget is one group of "
                f"{len(smallest)} images); raise n_labels or turn model selection off")
        logger.warning("no group of the label budget fits n_val=%d validation images; "
                       "validating on the smallest group instead (%d images)", n_val,
                       len(smallest))
        val = list(smallest)
    return val


def make_splits(info: DatasetInfo, *, n_labels: int, n_val: int = 0, seed: int,
                test_fraction: float = 0.2) -> Splits:
    """Fix the test split, the label budget and the validation images inside it.

    ``test`` is ``dataset.json``'s test split if any (train = its train split, or all other ids);
    with only a train split declared, the other ids; else a seeded ``test_fraction`` of the
    groups (whole groups until ``round(test_fraction · n)`` images are held out).

    The label budget is ``n_labels`` images **in total**: one seeded permutation of the train
    split's groups, with each group's ids kept together, is cut after its first ``n_labels`` ids
    (the last group may be cut: its other ids stay unlabelled). So a larger budget with the same
    seed is a superset of a smaller one. ``val`` = the budget's first whole groups that fit in
    ``n_val`` images (exactly ``n_val`` without groups; 0 turns model selection off),
    ``labelled`` = the rest of the budget, ``unlabelled`` = the train ids outside the budget.
    ``test``, ``val`` and ``labelled`` never share a group; budgets count images.
    """
    _check_counts(n_labels, n_val)
    train, test = _train_pool(info, seed, test_fraction)
    if len(train) < n_labels:
        raise DatasetError(f"{info.root}: too few training images: the train split has "
                           f"{len(train)} but the label budget is n_labels={n_labels}")
    groups = _grouped(info, train)
    perm = np.random.default_rng([seed, 0x1AB]).permutation(len(groups))
    order = [i for j in perm for i in groups[j]]
    budget = order[:n_labels]
    val = _carve_val(_grouped(info, budget), n_val, n_labels)
    held = set(val)
    labelled = [i for i in budget if i not in held]
    unlabelled = order[n_labels:]
    if val and len(val) != n_val:
        logger.info("validation: %d images (whole groups) instead of n_val=%d; %d labelled "
                    "for training", len(val), n_val, len(labelled))
    return Splits(labelled=tuple(sorted(labelled)), val=tuple(sorted(val)),
                  test=tuple(sorted(test)), unlabelled=tuple(sorted(unlabelled)))
