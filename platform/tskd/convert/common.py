"""Shared machinery of the dataset converters: an atomic writer, resizing, mask helpers, summaries.

Every converter writes through :class:`DatasetWriter`::

    with DatasetWriter(dst, fmt="ph2", src=src, size=None) as out:
        out.add("IMD002", image_uint8_rgb, mask_int)           # resized here if size is set
        summary = out.finish(name="PH2", modality="dermoscopy",
                             labels={0: "background", 1: "lesion"})

The writer fills a hidden temporary directory next to ``dst`` (same file system), writes
``dataset.json`` with :func:`tskd.data.format.write_dataset_json`, runs
:func:`tskd.data.format.validate_dataset` on it and only then moves it to ``dst`` with
:func:`os.replace`. On any error the temporary directory is removed and ``dst`` is left as it was
(``dst`` must not exist or be an empty directory).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tskd.data.format import DatasetError, read_image, validate_dataset, write_dataset_json

logger = logging.getLogger(__name__)

_BAD_ID = re.compile(r"[/\\\x00]")


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConversionSummary:
    """What a conversion wrote: counts, classes, pixel share per class (0..1), split sizes."""

    format: str
    src: Path
    dst: Path
    name: str
    modality: str
    n_images: int
    classes: dict[int, str]
    pixel_share: dict[str, float]
    splits: dict[str, int] | None
    spacing: tuple[float, float] | None = None
    size: tuple[int, int] | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    resize: str = "stretch"
    """How images were fitted into ``size`` (:data:`RESIZE_MODES`)."""

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "src": str(self.src), "dst": str(self.dst),
                "name": self.name, "modality": self.modality, "n_images": self.n_images,
                "classes": {str(k): v for k, v in self.classes.items()},
                "pixel_share": dict(self.pixel_share), "splits": self.splits,
                "spacing": None if self.spacing is None else list(self.spacing),
                "size": None if self.size is None else list(self.size),
                "resize": None if self.size is None else self.resize,
                "notes": list(self.notes)}

    def format_text(self) -> str:
        """A short human-readable report (what the CLI prints)."""
        splits = ("none declared" if not self.splits
                  else ", ".join(f"{k} {v}" for k, v in self.splits.items()))
        spacing = "unknown" if self.spacing is None else \
            f"{self.spacing[0]:.4g} x {self.spacing[1]:.4g} mm"
        size = "native" if self.size is None else \
            f"{self.size[1]}x{self.size[0]} px ({self.resize})"
        lines = [f"converted {self.format}: {self.src} -> {self.dst}",
                 f"  name: {self.name}   modality: {self.modality}   images: {self.n_images}"
                 f"   size: {size}   spacing: {spacing}",
                 f"  splits: {splits}",
                 "  classes (pixel share):"]
        width = max(len(n) for n in self.classes.values())
        for value, name in sorted(self.classes.items()):
            share = self.pixel_share.get(name, 0.0)
            lines.append(f"    {value:>3}  {name.ljust(width)}  {100 * share:7.3f} %")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format_text()


# ----------------------------------------------------------------------------------------------
# Atomic output directory
# ----------------------------------------------------------------------------------------------


def check_destination(dst: str | os.PathLike[str]) -> Path:
    """``dst`` as a Path; it must not exist, or be an empty directory."""
    dst = Path(dst).expanduser()
    if dst.exists() or dst.is_symlink():
        if not dst.is_dir() or any(dst.iterdir()):
            raise DatasetError(f"{dst}: destination already exists and is not an empty "
                               f"directory; remove it or choose another")
    return dst


@contextmanager
def atomic_directory(dst: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory next to ``dst``; on success it replaces ``dst`` atomically.

    On any exception the temporary directory is deleted and ``dst`` is untouched.
    """
    dst = check_destination(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.converting-", dir=dst.parent))
    try:
        yield tmp
        check_destination(dst)  # nobody created it meanwhile
        if dst.is_dir():
            dst.rmdir()  # empty (checked); os.replace onto a non-empty dir would fail anyway
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# Pixels
# ----------------------------------------------------------------------------------------------


def as_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``N`` → ``(N, N)``; ``(h, w)`` stays; ``None``/``0`` → native size (no resizing)."""
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        hw = (int(size), int(size))
    else:
        hw = tuple(int(s) for s in size)  # type: ignore[union-attr]
        if len(hw) != 2:
            raise DatasetError(f"size must be N or (height, width), got {size!r}")
    if hw == (0, 0):
        return None
    if min(hw) < 1:
        raise DatasetError(f"size must be positive, got {size!r}")
    return hw[0], hw[1]


def resize_image(image: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Bilinear resize of a uint8 ``(H, W)`` or ``(H, W, 3)`` image to ``size`` = (h, w)."""
    if size is None or image.shape[:2] == size:
        return image
    h, w = size
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


RESIZE_MODES = ("stretch", "letterbox")
"""How :class:`DatasetWriter` fits an image into ``size``: ``stretch`` scales each axis on its
own (a 4:3 image drawn onto a square is distorted); ``letterbox`` scales both axes by the same
factor so the image fits, and pads the rest with zeros (background, outside the field of view)."""


def letterbox_geometry(shape: Sequence[int], size: tuple[int, int]
                       ) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((h', w'), (top, left))``: the scaled size that fits ``shape`` (h, w) into ``size``
    with one scale factor ``min(H/h, W/w)``, and where it sits (centred)."""
    h, w = int(shape[0]), int(shape[1])
    scale = min(size[0] / h, size[1] / w)
    nh = min(size[0], max(1, round(h * scale)))
    nw = min(size[1], max(1, round(w * scale)))
    return (nh, nw), ((size[0] - nh) // 2, (size[1] - nw) // 2)


def letterbox(a: np.ndarray, size: tuple[int, int], *, label: bool) -> np.ndarray:
    """Scale ``a`` (image: bilinear; ``label``: nearest) to fit ``size`` keeping its aspect
    ratio, centred on a zero canvas of ``size`` (+ channels)."""
    (nh, nw), (top, left) = letterbox_geometry(a.shape[:2], size)
    scaled = resize_mask(a, (nh, nw)) if label else resize_image(a, (nh, nw))
    out = np.zeros(size + a.shape[2:], a.dtype)
    out[top:top + nh, left:left + nw] = scaled
    return out


def resize_mask(mask: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Nearest-neighbour resize of a label (or boolean) mask to ``size`` = (h, w)."""
    if size is None or mask.shape[:2] == size:
        return mask
    if mask.dtype == bool:
        return resize_mask(mask.astype(np.uint8), size).astype(bool)
    if mask.min() < 0 or mask.max() > 255:
        raise DatasetError(f"label values outside 0..255 cannot be resized: "
                           f"{int(mask.min())}..{int(mask.max())}")
    h, w = size
    out = Image.fromarray(mask.astype(np.uint8)).resize((w, h), Image.NEAREST)
    return np.asarray(out).astype(mask.dtype)


def read_binary_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """A binary mask file (0/1, 0/255, 1-bit, palette, grey or RGB) as ``bool (H, W)``.

    Read with :func:`tskd.data.format.read_image` (palettes expanded, grey replicated); a pixel
    is foreground when its brightest channel is > 127 (or > 0 if the file only holds 0/1).
    """
    rgb = read_image(path)
    grey = rgb.max(axis=2)
    return grey > (0 if grey.max() <= 1 else 127)


def natural_key(text: str) -> tuple:
    """Sort key that orders embedded numbers numerically ("IMG-2" < "IMG-10")."""
    return tuple(int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text))


def source_dir(src: str | os.PathLike[str]) -> Path:
    """The conversion source as a Path; ``DatasetError`` naming it when it is not a directory."""
    path = Path(src).expanduser()
    if not path.is_dir():
        raise DatasetError(f"{path}: source directory does not exist")
    return path


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{path}: {what} directory is missing")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{path}: {what} is missing")
    return path


def image_files(directory: Path, extensions: Sequence[str]) -> list[Path]:
    """Non-hidden files of ``directory`` with one of ``extensions`` (case-insensitive), sorted."""
    exts = tuple(e.lower() for e in extensions)
    return sorted((p for p in directory.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts),
                  key=lambda p: natural_key(p.name))


# ----------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------


class DatasetWriter:
    """Write a tskd dataset atomically (see the module docstring).

    ``size`` (int or (h, w)) resizes every image (bilinear) and mask/fov (nearest); ``None``
    keeps each image's own size. ``resize`` (:data:`RESIZE_MODES`) says how: ``stretch``
    (default) or ``letterbox`` (aspect kept, zero padding). Images are written as PNG (grey stays
    grey), masks as 8-bit PNG label images, field-of-view masks as 0/255 PNG.
    """

    def __init__(self, dst: str | os.PathLike[str], *, fmt: str, src: str | os.PathLike[str],
                 size: int | Sequence[int] | None = None, resize: str = "stretch") -> None:
        if resize not in RESIZE_MODES:
            raise DatasetError(f"resize: invalid value {resize!r}; allowed: "
                               f"{', '.join(RESIZE_MODES)}")
        self.dst = check_destination(dst)
        self.src = Path(src)
        self.fmt = fmt
        self.size = as_size(size)
        self.resize = resize
        self.notes: list[str] = []
        self._ids: list[str] = []
        self._counts = np.zeros(256, np.int64)
        self._fov: bool | None = None
        self._ctx: Any = None
        self._root: Path | None = None
        self._summary: ConversionSummary | None = None

    def __enter__(self) -> DatasetWriter:
        self._ctx = atomic_directory(self.dst)
        self._root = self._ctx.__enter__()
        for sub in ("images", "masks"):
            (self._root / sub).mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None and self._summary is None:
            err = DatasetError(f"{self.dst}: conversion ended without finish(); nothing written")
            self._ctx.__exit__(DatasetError, err, None)  # removes the temporary directory
            raise err
        self._ctx.__exit__(exc_type, exc, tb)
        return False

    @property
    def n_images(self) -> int:
        return len(self._ids)

    def add(self, case_id: str, image: np.ndarray, mask: np.ndarray,
            fov: np.ndarray | None = None) -> None:
        """Add one case: ``image`` uint8 (H, W) or (H, W, 3); ``mask`` integer labels (H, W);
        ``fov`` bool (H, W) or None (all cases must agree on having one)."""
        assert self._root is not None, "use DatasetWriter as a context manager"
        if not case_id or case_id.startswith(".") or _BAD_ID.search(case_id):
            raise DatasetError(f"{self.src}: invalid case id {case_id!r}")
        if case_id in self._ids:
            raise DatasetError(f"{self.src}: two cases have the id {case_id!r}")
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise TypeError(f"image must be uint8 (H, W) or (H, W, 3), got {image.dtype} "
                            f"{image.shape}")
        if mask.shape != image.shape[:2]:
            raise DatasetError(f"{self.src}: case {case_id!r}: mask size "
                               f"{mask.shape[1]}x{mask.shape[0]} differs from image size "
                               f"{image.shape[1]}x{image.shape[0]}")
        has_fov = fov is not None
        if self._fov is None:
            self._fov = has_fov
            if has_fov:
                (self._root / "fov").mkdir()
        elif self._fov != has_fov:
            raise DatasetError(f"{self.src}: case {case_id!r} "
                               f"{'has' if has_fov else 'lacks'} a field-of-view mask, unlike "
                               f"the cases before it")
        mask = np.asarray(mask)
        if self.resize == "letterbox" and self.size is not None:
            image = letterbox(image, self.size, label=False)
            mask = letterbox(mask, self.size, label=True)
        else:
            image = resize_image(image, self.size)
            mask = resize_mask(mask, self.size)
        if mask.min() < 0 or mask.max() > 255:
            raise DatasetError(f"{self.src}: case {case_id!r}: label values outside 0..255")
        mask8 = mask.astype(np.uint8)
        Image.fromarray(image).save(self._root / "images" / f"{case_id}.png")
        Image.fromarray(mask8).save(self._root / "masks" / f"{case_id}.png")
        if fov is not None:
            fov_b = np.asarray(fov, dtype=bool)
            fov_b = letterbox(fov_b, self.size, label=True) \
                if self.resize == "letterbox" and self.size is not None \
                else resize_mask(fov_b, self.size)
            fov8 = fov_b.astype(np.uint8) * 255
            Image.fromarray(fov8).save(self._root / "fov" / f"{case_id}.png")
        self._counts += np.bincount(mask8.ravel(), minlength=256)
        self._ids.append(case_id)

    def spacing_after(self, spacing: Sequence[float], shape: Sequence[int]
                      ) -> tuple[float, float]:
        """A case's spacing (sy, sx) after this writer resizes an image of ``shape`` (h, w)."""
        return scaled_spacing(spacing, shape, self.size, self.resize)

    def note(self, text: str) -> None:
        """A remark for the summary (e.g. skipped files)."""
        logger.info("%s: %s", self.fmt, text)
        self.notes.append(text)

    def finish(self, *, name: str, modality: str, labels: Mapping[int, str],
               spacing: Sequence[float] | None = None,
               splits: Mapping[str, Sequence[str]] | None = None,
               groups: Mapping[str, str] | None = None,
               spacing_per_case: Mapping[str, Sequence[float]] | None = None,
               extra: Mapping[str, Any] | None = None) -> ConversionSummary:
        """Write dataset.json, validate the whole dataset, and build the summary.

        The move to ``dst`` happens when the ``with`` block ends without error.
        """
        assert self._root is not None, "use DatasetWriter as a context manager"
        if not self._ids:
            raise DatasetError(f"{self.src}: no cases found for format {self.fmt!r} "
                               f"(empty or unrecognised source)")
        n_labels = len(labels)
        present = np.flatnonzero(self._counts)
        if present.size and present.max() >= n_labels:
            raise DatasetError(f"{self.src}: masks hold label values {present.tolist()} but "
                               f"only 0..{n_labels - 1} are declared")
        write_dataset_json(self._root, name=name, modality=modality, labels=labels,
                           spacing=spacing, splits=splits, groups=groups,
                           spacing_per_case=spacing_per_case, extra=extra)
        try:
            validate_dataset(self._root)
        except DatasetError as e:
            raise DatasetError(f"converted dataset failed validation (nothing written to "
                               f"{self.dst}): {e}") from None
        total = int(self._counts.sum())
        share = {labels[v]: (float(self._counts[v]) / total if total else 0.0)
                 for v in sorted(labels)}
        split_sizes = None if splits is None else {k: len(v) for k, v in splits.items()}
        self._summary = ConversionSummary(
            format=self.fmt, src=self.src, dst=self.dst, name=name, modality=modality,
            n_images=len(self._ids), classes={int(k): v for k, v in sorted(labels.items())},
            pixel_share=share, splits=split_sizes,
            spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
            size=self.size, notes=tuple(self.notes), resize=self.resize)
        return self._summary


def scaled_spacing(spacing: Sequence[float], shape: Sequence[int],
                   size: tuple[int, int] | None, resize: str = "stretch"
                   ) -> tuple[float, float]:
    """Pixel spacing (sy, sx) after resizing an image of ``shape`` (h, w) to ``size`` with the
    :data:`RESIZE_MODES` mode ``resize`` (letterbox: the scaled image's own size counts)."""
    sy, sx = float(spacing[0]), float(spacing[1])
    if size is None:
        return sy, sx
    if resize == "letterbox":
        size = letterbox_geometry(shape, size)[0]
    return sy * shape[0] / size[0], sx * shape[1] / size[1]
