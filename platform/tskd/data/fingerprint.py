"""A dataset fingerprint and the resolution plan made from it (core: numpy + scipy, no Ray).

In the spirit of nnU-Net's planning: read the masks once, measure what the models must resolve,
and choose the working size from it instead of a fixed 128 px::

    >>> fp = compute_fingerprint(info)                                      # doctest: +SKIP
    >>> plan = plan_resolution(fp)                                          # doctest: +SKIP
    >>> plan.image_size, plan.warnings                                      # doctest: +SKIP

What is measured, per foreground class (on up to ``max_cases`` masks, at native resolution):

- ``pixel_share``: its share of all pixels;
- objects: 8-connected components per image, their median area and the area of the smallest
  tenth (``small_object_px``, 10th percentile);
- structure width: the mask is upsampled 2x (nearest, so every width becomes even) and its
  Euclidean distance transform taken; the pixels on the ridge of that transform (within 0.5 of
  their 3x3 maximum: the medial axis of lines, the centres of blobs, not the diagonals to a
  square's corners) carry the local half-width, which on the 2x grid equals the width in native
  pixels. A horizontal line of width w gives exactly w; ``width_px`` is the median over ridge
  pixels, ``thin_width_px`` the 10th percentile.

The plan (:func:`plan_resolution`) picks the smallest working size (a multiple of 32, at least
128 px, at most the native size) at which every class's median width stays >= ``min_width_px``
(2 px) and its median object keeps >= ``min_object_px`` (4 px) (typical structures, so that
annotation specks do not force the native size); larger than ``max_size`` means patches are needed
(``needs_patches``): the images keep the working size and the models train on ``max_size``
crops (``tskd.data.patches``) and predict window by window
(``tskd.evaluation.sliding_window_logits``). :func:`size_warnings` names every class whose structures a
given size (the data's, the teacher's, the student's) makes thinner than 2 px or whose small
objects vanish.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from tskd.data.format import DatasetInfo, load_dataset_info, make_splits, read_mask

if TYPE_CHECKING:
    from tskd.config import ExperimentConfig

log = logging.getLogger(__name__)

MIN_WIDTH_PX = 2.0
"""Structures thinner than this at the working size are at risk (a 1-px line is aliased away
by bilinear/nearest resizing and a 16-px ViT patch cannot place it)."""
MIN_OBJECT_PX = 4.0
"""Objects smaller than this many pixels at the working size vanish."""
TEACHER_LOGIT_STRIDE = 4
"""SAM's mask logits are at 1/4 of its input size (``tskd.models.sam.SamSegmenter``)."""
MAX_TEACHER_SIZE = 1024


def structure_widths(binary: np.ndarray) -> np.ndarray:
    """Local widths (native pixels) of the structures of a binary mask.

    Args:
        binary: bool or 0/1 ``(H, W)``.

    Returns:
        float64 ``(K,)``: the width at each ridge pixel of the distance transform on the 2x
        nearest-upsampled mask (see the module docstring); empty if the mask is empty.
    """
    binary = np.asarray(binary, bool)
    if not binary.any():
        return np.zeros(0)
    up = np.pad(binary.repeat(2, axis=0).repeat(2, axis=1), 1)  # background around the border
    dist = ndimage.distance_transform_edt(up)
    ridge = (dist > 0) & (dist >= ndimage.maximum_filter(dist, size=3) - 0.5)
    return dist[ridge].astype(np.float64)


def object_areas(binary: np.ndarray) -> np.ndarray:
    """Areas (pixels) of the 8-connected components of a binary mask, int64 ``(N,)``."""
    labels, n = ndimage.label(np.asarray(binary, bool), structure=np.ones((3, 3), bool))
    if n == 0:
        return np.zeros(0, np.int64)
    return np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.int64)


@dataclass
class ClassStats:
    """What one foreground class looks like at native resolution."""

    name: str
    pixel_share: float
    """Share of all pixels (of the measured masks)."""
    images_with_class: int
    objects_per_image: float
    """Mean number of 8-connected components over images that contain the class."""
    object_px: float
    """Median component area (native pixels)."""
    small_object_px: float
    """10th percentile of the component areas."""
    width_px: float
    """Median local structure width (native pixels; NaN if the class never occurs)."""
    thin_width_px: float
    """10th percentile of the local widths: the thinnest structures."""


@dataclass
class DatasetFingerprint:
    """Image sizes, spacing and per-class statistics of a dataset (see the module docstring)."""

    name: str
    n_cases: int
    n_measured: int
    height: dict[str, float]
    """``{"min", "median", "max"}`` of the image heights (pixels)."""
    width: dict[str, float]
    spacing: list[float] | None
    """Median (y, x) spacing in mm per pixel, or None (pixels only)."""
    classes: dict[str, ClassStats] = field(default_factory=dict)

    @property
    def native_size(self) -> int:
        """The median image's longer side: the size at which nothing is shrunk."""
        return int(round(max(self.height["median"], self.width["median"])))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"native_size": self.native_size}


def _spread(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, np.float64)
    return {"min": float(a.min()), "median": float(np.median(a)), "max": float(a.max())}


def fingerprint_masks(masks: Sequence[np.ndarray], class_names: Sequence[str], *,
                      name: str = "dataset", n_cases: int | None = None,
                      spacing: list[float] | None = None) -> DatasetFingerprint:
    """The fingerprint of label masks ``int64 (H, W)`` with values ``0..C-1``
    (``class_names[c]`` names value ``c``; class 0 is the background and is not measured)."""
    total = sum(m.size for m in masks)
    classes: dict[str, ClassStats] = {}
    for c, cname in enumerate(class_names):
        if c == 0:
            continue
        pixels, widths, areas, counts = 0, [], [], []
        for m in masks:
            binary = m == c
            if not binary.any():
                continue
            pixels += int(binary.sum())
            widths.append(structure_widths(binary))
            a = object_areas(binary)
            areas.append(a)
            counts.append(a.size)
        w = np.concatenate(widths) if widths else np.zeros(0)
        a = np.concatenate(areas) if areas else np.zeros(0)
        nan = float("nan")
        classes[cname] = ClassStats(
            name=cname, pixel_share=pixels / total if total else 0.0,
            images_with_class=len(counts),
            objects_per_image=float(np.mean(counts)) if counts else 0.0,
            object_px=float(np.median(a)) if a.size else nan,
            small_object_px=float(np.percentile(a, 10)) if a.size else nan,
            width_px=float(np.median(w)) if w.size else nan,
            thin_width_px=float(np.percentile(w, 10)) if w.size else nan)
    return DatasetFingerprint(
        name=name, n_cases=len(masks) if n_cases is None else n_cases, n_measured=len(masks),
        height=_spread([m.shape[0] for m in masks]), width=_spread([m.shape[1] for m in masks]),
        spacing=spacing, classes=classes)


def compute_fingerprint(info: DatasetInfo, case_ids: Sequence[str] | None = None, *,
                        max_cases: int = 100, seed: int = 0) -> DatasetFingerprint:
    """Fingerprint of a dataset: reads the masks of ``case_ids`` (default all cases; a seeded
    subset of ``max_cases`` when there are more)."""
    ids = list(case_ids if case_ids is not None else info.case_ids)
    n_cases = len(ids)
    if len(ids) > max_cases:
        pick = np.random.default_rng(seed).choice(len(ids), max_cases, replace=False)
        ids = [ids[i] for i in sorted(pick)]
    masks = [read_mask(info.masks[i], info.labels) for i in ids]
    spacings = [s for s in (info.spacing_of(i) for i in ids) if s is not None]
    spacing = [float(v) for v in np.median(np.asarray(spacings), axis=0)] if spacings else None
    return fingerprint_masks(masks, info.class_names, name=info.name, n_cases=n_cases,
                             spacing=spacing)


@dataclass
class Plan:
    """The working resolution chosen from a fingerprint."""

    native_size: int
    working_size: int
    """The size (a multiple of 32, which every student arch accepts) that keeps every class resolvable (<= native)."""
    image_size: int
    """What ``data.image_size: auto`` takes: ``working_size`` (with patches beyond
    ``max_size``)."""
    teacher_img_size: int
    """The teacher's input size (>= ``image_size``, <= 1024) at which every class's typical
    structures span at least one cell of SAM's logit grid (1/4 of the input)."""
    patch_size: int
    """What ``data.patch_size: auto`` takes: ``min(working_size, max_size)``."""
    needs_patches: bool
    """``working_size`` exceeds ``max_size``: the models train on patches of ``max_size``."""
    limiting_class: str | None
    """The class that sets ``working_size`` (None: nothing limits it)."""
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple - 1e-9) * multiple)


def _required_scale(stats: ClassStats, min_width_px: float, min_object_px: float) -> float:
    need = 0.0
    if math.isfinite(stats.width_px) and stats.width_px > 0:
        need = max(need, min_width_px / stats.width_px)
    if math.isfinite(stats.object_px) and stats.object_px > 0:  # typical objects, not specks
        need = max(need, math.sqrt(min_object_px / stats.object_px))
    return need


def plan_resolution(fp: DatasetFingerprint, *, min_width_px: float = MIN_WIDTH_PX,
                    min_object_px: float = MIN_OBJECT_PX, max_size: int = 512,
                    min_size: int = 128, multiple: int = 32) -> Plan:
    """The smallest size that keeps every class resolvable, but not below ``min_size`` (nor
    above the native size): coarse structures do not shrink the images below the size the
    models were designed around; thin ones raise it (see the module docstring)."""
    native = fp.native_size
    native_up = max(min_size, _round_up(native, multiple))
    scales = {c: _required_scale(s, min_width_px, min_object_px) for c, s in fp.classes.items()}
    limiting = max(scales, key=scales.get) if scales else None
    need = min(1.0, scales[limiting]) if limiting else 0.0
    needed = _round_up(need * native, multiple)
    working = min(native_up, max(min_size, needed))
    image_size = working  # beyond max_size: patches of max_size (tskd.data.patches)
    needs_patches = working > max_size
    patch = min(working, max_size)
    # the teacher's logits are 1/4 of its input: a structure should span one logit cell (the
    # teacher sees a patch of the working-size image at its input size)
    widths = [st.width_px for st in fp.classes.values()
              if math.isfinite(st.width_px) and st.width_px > 0]
    teacher_need = max((TEACHER_LOGIT_STRIDE * native / w * patch / working for w in widths),
                       default=0.0)
    teacher = min(MAX_TEACHER_SIZE, max(patch, _round_up(teacher_need, 16)))
    plan = Plan(native_size=native, working_size=working, image_size=image_size,
                teacher_img_size=teacher, patch_size=patch,
                needs_patches=needs_patches,
                limiting_class=limiting if limiting and need > 0 and needed >= min(
                    min_size, native_up) else None)
    plan.warnings += size_warnings(fp, {"data.image_size (planned)": image_size},
                                   min_width_px=min_width_px, min_object_px=min_object_px)
    return plan


def size_warnings(fp: DatasetFingerprint, sizes: dict[str, int], *,
                  min_width_px: float = MIN_WIDTH_PX,
                  min_object_px: float = MIN_OBJECT_PX) -> list[str]:
    """Warnings for each ``{field: working size}`` that makes a class's typical structures
    thinner than ``min_width_px`` or its smallest objects (10th percentile) smaller than
    ``min_object_px`` pixels; each names the field, the class and the numbers."""
    native = fp.native_size
    out = []
    for fieldname, size in sizes.items():
        scale = size / native
        for c, s in fp.classes.items():
            if math.isfinite(s.width_px) and s.width_px * scale < min_width_px:
                where = ("already at native resolution" if scale >= 1 else
                         f"{fieldname}={size} shrinks the {native}-px images {1 / scale:.1f}x")
                out.append(f"class {c!r}: its structures are {s.width_px:.1f} px wide (median; "
                           f"thinnest tenth {s.thin_width_px:.1f} px) and {where}: "
                           f"{s.width_px * scale:.2f} px, thinner than {min_width_px:g} px")
            if (math.isfinite(s.small_object_px)
                    and s.small_object_px * scale**2 < min_object_px <= s.small_object_px):
                out.append(f"class {c!r}: {fieldname}={size} shrinks its smallest objects "
                           f"(10th percentile {s.small_object_px:.0f} px) to "
                           f"{s.small_object_px * scale**2:.1f} px: they vanish")
    return out


def teacher_logit_warnings(fp: DatasetFingerprint, teacher_size: int, *,
                           patch_scale: float = 1.0) -> list[str]:
    """Warnings for each class whose typical structures span less than one cell of the teacher's
    logit grid (``teacher_size / 4``, relative to the native images; with patches the teacher
    sees a ``1 / patch_scale`` share of the image's side at ``teacher_size``)."""
    scale = teacher_size * patch_scale / fp.native_size / TEACHER_LOGIT_STRIDE
    where = "" if patch_scale == 1.0 else f" per patch ({1 / patch_scale:.2f} of the image side)"
    return [f"class {c!r}: teacher.img_size={teacher_size}{where} puts SAM's logits on a "
            f"{teacher_size // TEACHER_LOGIT_STRIDE}-px grid (1/{TEACHER_LOGIT_STRIDE} of its "
            f"input): its {s.width_px:.1f}-px structures span {s.width_px * scale:.2f} of a "
            f"logit cell; a teacher input of "
            f"{_round_up(TEACHER_LOGIT_STRIDE * fp.native_size / s.width_px / patch_scale, 16)}"
            f" px gives one"
            for c, s in fp.classes.items()
            if math.isfinite(s.width_px) and s.width_px > 0 and s.width_px * scale < 1.0]


def format_fingerprint(fp: DatasetFingerprint, plan: Plan,
                       extra_warnings: Sequence[str] = ()) -> str:
    """The fingerprint, plan and warnings as plain text (``tskd inspect``)."""
    h, w = fp.height, fp.width
    sp = (f"{fp.spacing[0]:.4g} x {fp.spacing[1]:.4g} mm" if fp.spacing else "unknown (pixels)")
    lines = [f"dataset {fp.name}: {fp.n_cases} cases ({fp.n_measured} measured)",
             f"image size (h x w): median {h['median']:.0f} x {w['median']:.0f} px "
             f"(min {h['min']:.0f} x {w['min']:.0f}, max {h['max']:.0f} x {w['max']:.0f}); "
             f"spacing {sp}", ""]
    head = ["class", "pixels %", "images", "objects/img", "object px", "small obj px",
            "width px", "thin width px"]
    rows = [head] + [[c, f"{100 * s.pixel_share:.2f}", str(s.images_with_class),
                      f"{s.objects_per_image:.1f}", f"{s.object_px:.0f}",
                      f"{s.small_object_px:.0f}", f"{s.width_px:.1f}", f"{s.thin_width_px:.1f}"]
                     for c, s in fp.classes.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines += ["  ".join(cell.ljust(wd) for cell, wd in zip(r, widths)) for r in rows]
    lines += ["", f"plan: working size {plan.working_size} px"
              + (f" (set by class {plan.limiting_class!r})" if plan.limiting_class else "")
              + f"; data.image_size auto = {plan.image_size}; teacher.img_size "
              f"{plan.teacher_img_size} (its logits: 1/{TEACHER_LOGIT_STRIDE}); patches "
              f"{'needed' if plan.needs_patches else 'not needed'}"
              + (f" (patch {plan.patch_size} px)" if plan.needs_patches else "")]
    for warning in [*plan.warnings, *extra_warnings]:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def budget_cases(info: DatasetInfo, cfg: ExperimentConfig) -> list[str]:
    """The label budget's cases (training + validation): the only masks a run may read, so the
    plan is made from them."""
    splits = make_splits(info, n_labels=cfg.data.n_labels, n_val=cfg.data.n_val, seed=cfg.seed,
                         test_fraction=cfg.data.test_fraction)
    return [*splits.labelled, *splits.val]


def model_sizes(cfg: ExperimentConfig, image_size: int,
                patch: int | None = None) -> dict[str, int]:
    """The sizes a run's models see the data at: ``data.image_size``, and the teacher's and the
    student's input sizes where they shrink the data further. With patches (``patch`` <
    ``image_size``) a model sees each ``patch``-px crop at its input size: the whole-image size
    it amounts to is ``img_size * image_size / patch``."""
    patch = image_size if patch is None else min(patch, image_size)
    sizes = {"data.image_size": image_size}
    for name, size in (("teacher.img_size", cfg.teacher.img_size),
                       ("student.img_size", cfg.student.img_size)):
        if patch < image_size:
            name = f"{name} ({size} px per {patch}-px patch)"
            size = round(size * image_size / patch)
        if size < image_size:
            sizes[name] = size
    return sizes


def resolved_patch(cfg: ExperimentConfig, image_size: int) -> int:
    """``data.patch_size`` for an image size: ``auto`` = ``min(image_size, max_image_size)``,
    an integer capped at ``image_size``."""
    return dataclasses.replace(cfg.data, image_size=image_size).patch


def plan_for_config(info: DatasetInfo, cfg: ExperimentConfig
                    ) -> tuple[DatasetFingerprint, Plan, list[str]]:
    """Fingerprint of the budget's masks, the plan, and the warnings for the sizes the run
    will use (``auto`` resolved to the plan's ``image_size``)."""
    fp = compute_fingerprint(info, budget_cases(info, cfg), seed=cfg.seed)
    plan = plan_resolution(fp, max_size=cfg.data.max_image_size)
    size = plan.image_size if cfg.data.image_size == "auto" else int(cfg.data.image_size)
    patch = resolved_patch(cfg, size)
    warnings = (size_warnings(fp, model_sizes(cfg, size, patch))
                + teacher_logit_warnings(fp, cfg.teacher.img_size, patch_scale=size / patch))
    return fp, plan, warnings


def resolve_image_size(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with ``data.image_size: auto`` replaced by a number: the plan's ``image_size``
    (its working size; beyond ``data.max_image_size`` the models train on patches of that size)
    for a dataset directory, ``data.demo.size`` for the built-in demos (their native size).
    Explicit sizes are returned unchanged. ``data.patch_size`` stays as configured: the crop /
    window side is ``cfg.data.patch`` (``auto``: ``min(image_size, max_image_size)``). The
    result is validated again (size rules of the reference network)."""
    if cfg.data.image_size != "auto":
        return cfg
    if cfg.data.root is None:
        size = cfg.data.demo.size
        log.info("data.image_size auto: %d px (the demo's native size)", size)
    else:
        info = load_dataset_info(Path(cfg.data.root).expanduser())
        fp, plan, _ = plan_for_config(info, cfg)
        size = plan.image_size
        log.info("data.image_size auto: %d px (native %d px; %s)", size, plan.native_size,
                 f"set by class {plan.limiting_class!r}" if plan.limiting_class
                 else "no class limits it")
    out = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=size))
    out.validate()
    return out
