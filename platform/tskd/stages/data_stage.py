"""Stage ``data``: validate the dataset (or write the built-in demo) and fix the splits.

Output: ``fingerprint.json`` (:mod:`tskd.data.fingerprint` of the label budget's masks, the
resolution plan and the warnings for this run's sizes; also in the manifest's metrics as
``data/fingerprint``, ``data/plan``, ``data/size_warnings``) and ``splits.json`` (dataset root — relative to the stage directory for the demo —, labelled
/ val / test / unlabelled case ids, and the label counts ``n_labels`` (the budget),
``n_labelled_train``, ``n_labelled_val``). Validation images come from inside the budget
(``data.val_share``), none when ``data.model_selection`` is off. Every later stage reads the data
through :func:`load_data`, so all of them see the same budget and splits; the stage's metrics
carry ``data/n_labelled_train`` and ``data/n_labelled_val`` (also :attr:`Splits.n_train_labels` /
:attr:`Splits.n_val_labels`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tskd.artifacts import StageContext, write_json
from tskd.data.demo import write_demo_dataset
from tskd.data.format import DatasetInfo, Splits, load_dataset_info, make_splits, validate_dataset

log = logging.getLogger(__name__)

SPLITS_FILE = "splits.json"
FINGERPRINT_FILE = "fingerprint.json"


def dataset_root(ctx: StageContext) -> Path:
    """The configured dataset, or the demo dataset written into this stage's directory."""
    data = ctx.cfg.data
    if data.root is not None:
        return Path(data.root).expanduser().resolve()
    demo = data.demo
    log.info("writing the built-in %s demo dataset (%d images, %d px)", demo.kind,
             demo.n_images, demo.size)
    if demo.kind == "vessels":
        from tskd.data.demo_vessels import write_vessels_dataset

        return write_vessels_dataset(ctx.dir / "dataset", n_images=demo.n_images,
                                     size=demo.size, seed=demo.seed)
    return write_demo_dataset(ctx.dir / "dataset", n_images=demo.n_images, size=demo.size,
                              seed=demo.seed)


def record_fingerprint(ctx: StageContext, info: DatasetInfo) -> dict[str, Any]:
    """Fingerprint the label budget's masks, plan the resolution and warn (naming the class)
    about every size of this run that makes a class's structures too thin; written to
    ``fingerprint.json`` and returned for the manifest's metrics."""
    from tskd.data.fingerprint import plan_for_config

    fp, plan, warnings = plan_for_config(info, ctx.cfg)
    log.info("dataset plan: native %d px, working size %d px%s; data.image_size %s",
             plan.native_size, plan.working_size,
             f" (set by class {plan.limiting_class!r})" if plan.limiting_class else "",
             ctx.cfg.data.image_size)
    for warning in warnings:
        log.warning("%s", warning)
    record = {"fingerprint": fp.to_dict(), "plan": plan.to_dict(), "size_warnings": warnings}
    write_json(ctx.dir / FINGERPRINT_FILE, record)
    return record


def run(ctx: StageContext) -> dict[str, Any]:
    data = ctx.cfg.data
    root = dataset_root(ctx)
    info = validate_dataset(root, n_labels=data.n_labels, n_val=data.n_val,
                            test_fraction=data.test_fraction, seed=ctx.cfg.seed)
    splits = make_splits(info, n_labels=data.n_labels, n_val=data.n_val, seed=ctx.cfg.seed,
                         test_fraction=data.test_fraction)
    # the demo dataset lives in this stage's (temporary, then renamed) directory: record it
    # relative to the directory so the path survives the move into the store
    here = Path(ctx.dir).resolve()
    saved_root = root.resolve().relative_to(here) if root.resolve().is_relative_to(here) else root
    write_json(ctx.dir / SPLITS_FILE, {
        "root": str(saved_root), "name": info.name, "labels": info.labels,
        "labelled": list(splits.labelled), "val": list(splits.val),
        "test": list(splits.test), "unlabelled": list(splits.unlabelled),
        "n_labels": data.n_labels, "n_labelled_train": splits.n_train_labels,
        "n_labelled_val": splits.n_val_labels,
        "model_selection": splits.n_val_labels > 0})
    log.info("dataset %s: %d classes; label budget %d = %d for training + %d for validation "
             "(model selection %s); %d test, %d unlabelled", info.name, info.num_classes,
             data.n_labels, splits.n_train_labels, splits.n_val_labels,
             "on" if splits.n_val_labels else "off: last epoch kept", len(splits.test),
             len(splits.unlabelled))
    record = record_fingerprint(ctx, info)
    patches: dict[str, Any] = {}
    if data.image_size != "auto" and data.patches:
        log.info("patch training: %d-px crops of the %d-px images (%.0f%% centred on "
                 "foreground); sliding-window inference", data.patch, data.image_size,
                 100 * data.fg_fraction)
        patches = {"data/patch_size": data.patch, "data/fg_fraction": data.fg_fraction}
    return patches | {
            "data/num_classes": info.num_classes, "data/n_labelled": len(splits.labelled),
            "data/image_size": ctx.cfg.data.image_size,
            "data/plan": record["plan"], "data/size_warnings": record["size_warnings"],
            "data/fingerprint": record["fingerprint"],
            "data/n_labelled_train": splits.n_train_labels,
            "data/n_labelled_val": splits.n_val_labels,
            "data/n_val": len(splits.val), "data/n_test": len(splits.test),
            "data/n_unlabelled": len(splits.unlabelled)}


def load_data(stage_dir: Path) -> tuple[DatasetInfo, Splits]:
    """The dataset and splits fixed by a completed ``data`` stage."""
    saved = json.loads((Path(stage_dir) / SPLITS_FILE).read_text())
    info = load_dataset_info(Path(stage_dir) / saved["root"])  # relative: inside stage_dir
    splits = Splits(labelled=tuple(saved["labelled"]), val=tuple(saved["val"]),
                    test=tuple(saved["test"]), unlabelled=tuple(saved["unlabelled"]))
    return info, splits
