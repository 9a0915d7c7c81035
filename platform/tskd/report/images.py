"""Pictures for the report: qualitative overlays of each method's predictions on a few test
images (the paper's Figure 4) and samples of the transfer set beside their nearest training
image (core: torch, numpy, pyarrow; no Ray).

Students and the reference are rebuilt from their stage's manifest (``stage_config``) with
:func:`tskd.models.students.build_student` and their ``student.pt``, and run through the same
pre- and post-processing as ``tskd predict`` (:func:`tskd.predict.segment_logits`: sliding
windows for a student trained on patches; :func:`~tskd.predict.labels_from_logits`,
:func:`~tskd.predict.overlay_image`). The teacher is not
drawn (loading SAM with its adapters is stage code).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tskd.report.collect import Row, Run
from tskd.report.tables import method_key, method_name

log = logging.getLogger(__name__)

STUDENT_FILE = "student.pt"


def load_test_cases(data_dir: Path, n: int) -> tuple[Any, list[str]]:
    """The dataset of a ``data`` stage entry and ``n`` of its test ids, evenly spread."""
    from tskd.data.format import load_dataset_info

    saved = json.loads((Path(data_dir) / "splits.json").read_text())
    info = load_dataset_info(Path(data_dir) / saved["root"])  # relative: inside the entry
    test = list(saved["test"])
    if len(test) <= n:
        return info, test
    picks = np.linspace(0, len(test) - 1, n).round().astype(int)
    return info, [test[i] for i in picks]


def model_config(row: Row) -> dict[str, Any]:
    """The student config (a ``StudentConfig`` dict) of a student or reference row's stage."""
    from tskd.config import ReferenceConfig, to_dict

    manifest = json.loads((Path(row.stage_dir) / "manifest.json").read_text())
    sc = manifest["stage_config"]
    if row.kind == "reference":
        known = ReferenceConfig.__dataclass_fields__
        ref = ReferenceConfig(**{k: v for k, v in sc["reference"].items() if k in known})
        return to_dict(ref.student(sc.get("patch_size", sc["image_size"])))
    return dict(sc["student"])


def load_row_model(row: Row, num_classes: int):
    """The trained model of a student or reference row, in eval mode."""
    import torch

    from tskd.models.students import build_student

    model = build_student(model_config(row), num_classes)
    sd = torch.load(Path(row.stage_dir) / STUDENT_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(sd)
    return model.eval()


def predict_overlays(model: Any, images: Sequence[np.ndarray], *,
                     working_size: int | None = None, window: int | None = None
                     ) -> list[np.ndarray]:
    """``uint8 (H, W, 3)`` images -> the model's predictions tinted over them (same shapes), made
    as ``tskd predict`` makes them (:func:`tskd.predict.segment_logits`): one forward at the
    model's ``img_size``, or, for a model trained on patches (``window < working_size``),
    sliding windows over the image resized to ``working_size``."""
    from tskd.models.student import StudentInference
    from tskd.predict import (TorchSegmenter, labels_from_logits, overlay_image, segment_logits,
                              student_meta)

    meta = student_meta(model, {}, [], working_size=working_size, window=window)
    logits = segment_logits(TorchSegmenter(StudentInference(model), meta, Path("report")), images)
    return [overlay_image(img, labels_from_logits(lg, img.shape[:2]))
            for img, lg in zip(images, logits)]


def showcase_rows(rows: Sequence[Row]) -> list[Row]:
    """One scored student or reference row per method for the overlays: at the largest label
    budget, the largest transfer set, the lowest seed."""
    pick: dict[str, Row] = {}
    cand = [r for r in rows if not r.failed and r.kind in ("student", "reference")
            and r.stage_dir is not None and (Path(r.stage_dir) / STUDENT_FILE).is_file()]
    if not cand:
        return []
    top = max((r.labels for r in cand if r.labels is not None), default=None)
    for r in sorted(cand, key=lambda r: (-(r.transfer_size or 0), r.seed or 0)):
        if r.labels == top or top is None:
            pick.setdefault(r.method, r)
    return sorted(pick.values(), key=lambda r: method_key(r.method))


def overlays_figure(runs: Sequence[Run], rows: Sequence[Row], n_images: int
                    ) -> tuple[str | None, str]:
    """A grid: test image, ground truth and each method's prediction for ``n_images`` test
    images (base64 PNG), and a note on what was drawn or why nothing was."""
    from tskd.data.format import read_case
    from tskd.report.plots import image_grid
    from tskd.predict import overlay_image, patch_meta

    chosen = showcase_rows(rows)
    if not chosen or n_images <= 0:
        return None, "no trained student found to draw (no student.pt in the runs' stages)"
    run = next(r for r in runs if r.name == chosen[0].run)
    if "data" not in run.entries:
        return None, f"{run.name}: no data stage to take test images from"
    try:
        info, ids = load_test_cases(run.entries["data"], n_images)
    except Exception as exc:  # noqa: BLE001 - a moved dataset must not stop the report
        log.warning("overlays skipped: %s", exc)
        return None, f"test images not readable ({exc})"
    cases = [read_case(info, i) for i in ids]
    images = [c[0] for c in cases]
    columns = [[img, overlay_image(img, mask.astype(np.uint8))] for img, mask in cases]
    titles = ["image", "ground truth"]
    for row in chosen:
        try:
            model = load_row_model(row, info.num_classes)
            preds = predict_overlays(model, images,
                                     **patch_meta(Path(row.stage_dir) / "manifest.json"))
        except Exception as exc:  # noqa: BLE001 - one unloadable model must not stop the report
            log.warning("overlay of %s skipped: %s", row.method, exc)
            continue
        for col, pred in zip(columns, preds):
            col.append(pred)
        titles.append(method_name(row.method) + (f"\n({row.arch})" if row.kind == "reference"
                                                 else ""))
    where = (f"{len(ids)} test images of {run.name} (labels {chosen[0].labels}, seed "
             f"{chosen[0].seed}); each method at its largest transfer set")
    return image_grid(columns, titles, row_titles=ids), where


# ------------------------------------------------------------------------------ transfer set


def read_transfer_samples(stage_dir: Path, n: int) -> list[dict[str, Any]]:
    """The ``n`` lowest-id kept transfer images with their nearest-reference fields
    (``id``, ``image`` uint8 (H, W, 3), ``nn_index``, ``nn_psnr``, ``nn_kind``, ``source``),
    read from the parquet shards with pyarrow (Ray's tensor column is a list of uint8 whose
    shape is in the field's extension metadata)."""
    import pyarrow.parquet as pq

    shards = sorted((Path(stage_dir) / "images").glob("*.parquet"))
    ids = {shard: pq.read_table(shard, columns=["id"]).column("id").to_pylist()
           for shard in shards}  # the id column only: a large set is never read whole
    wanted = set(sorted(i for v in ids.values() for i in v)[:n])
    rows: list[dict[str, Any]] = []
    for shard in shards:
        if not wanted.intersection(ids[shard]):
            continue
        table = pq.read_table(shard, filters=[("id", "in", sorted(wanted))])
        if table.num_rows == 0:
            continue
        meta = table.schema.field("image").metadata or {}
        shape = json.loads(meta.get(b"ARROW:extension:metadata", b"null"))
        col = table.column("image").combine_chunks()
        if hasattr(col, "storage"):  # registered extension type (Ray imported elsewhere)
            col = col.storage
        flat = np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.uint8)
        if not shape:
            side = int(round((flat.size / table.num_rows / 3) ** 0.5))
            shape = [side, side, 3]
        images = flat.reshape(table.num_rows, *shape)
        cols = {c: table.column(c).to_pylist() for c in ("id", "nn_index", "nn_psnr", "nn_kind",
                                                         "source") if c in table.column_names}
        for i in range(table.num_rows):
            rows.append({"image": images[i]} | {c: v[i] for c, v in cols.items()})
    rows.sort(key=lambda r: r.get("id", 0))
    return rows[:n]


def transfer_figure(run: Run, n: int) -> tuple[str | None, str]:
    """``n`` transfer images over their nearest training image with its PSNR (base64 PNG),
    and a note; (None, why) when the run has no readable transfer set."""
    from tskd.data.format import read_case
    from tskd.report.plots import image_grid

    stage = run.entries.get("transfer")
    if stage is None:
        return None, "no transfer set"
    try:
        samples = read_transfer_samples(stage, n)
    except Exception as exc:  # noqa: BLE001
        log.warning("transfer samples of %s skipped: %s", run.name, exc)
        return None, f"transfer images not readable ({exc})"
    if not samples:
        return None, "the transfer set is empty"
    quality = json.loads((stage / "quality.json").read_text()) if (
        stage / "quality.json").is_file() else {}
    train_ids = quality.get("train_case_ids") or []
    nearest: list[np.ndarray | None] = [None] * len(samples)
    if train_ids and "data" in run.entries:
        try:
            info, _ = load_test_cases(run.entries["data"], 0)
            size = samples[0]["image"].shape[:2]
            for k, s in enumerate(samples):
                j = s.get("nn_index", -1)
                if j is not None and 0 <= j < len(train_ids):
                    img = read_case(info, train_ids[j])[0]
                    nearest[k] = _resize(img, size)
        except Exception as exc:  # noqa: BLE001
            log.warning("nearest training images of %s skipped: %s", run.name, exc)
    grid = [[s["image"] for s in samples]]
    captions = [[f"#{s.get('id')} ({s.get('source', '')})" for s in samples]]
    if any(x is not None for x in nearest):
        blank = np.full_like(samples[0]["image"], 255)
        grid.append([x if x is not None else blank for x in nearest])
        captions.append([_psnr_caption(s) for s in samples])
    return (image_grid(grid, [], row_titles=["transfer", "nearest train"][:len(grid)],
                       cell_titles=captions),
            f"the {len(samples)} lowest-id images of {run.name}'s transfer set; below each, "
            "the training image it is nearest to (before flips/augmentation) and the PSNR")


def _psnr_caption(sample: dict[str, Any]) -> str:
    p = sample.get("nn_psnr")
    kind = sample.get("nn_kind") or ""
    if p is None or p != p:
        return "real image"
    return f"{p:.1f} dB ({kind})" if kind else f"{p:.1f} dB"


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if img.shape[:2] == tuple(size):
        return img
    return np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.BILINEAR))
