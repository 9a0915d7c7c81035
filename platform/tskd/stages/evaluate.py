"""Stage ``evaluate``: Dice, HD95 and mIoU of the teacher, every student and the label-only
reference on the test split (each student and the reference with its arch, parameters, size and
CPU latency at batch 1; the latencies are measured here, the models taking turns, so that they
compare with each other whatever else the machine was doing).

Models see test images at the working resolution (``data.image_size``), window by window
when they were trained on patches (``data.patch_size``: MONAI's sliding window with Gaussian
blending, :func:`tskd.evaluation.window_logits`; one window = the whole-image forward); their
logits are upsampled to each image's original size and scored against the original mask (and field of view)
with the dataset's pixel spacing, so HD95 is in mm when the spacing is known. The empty-mask
convention (``evaluate.convention``) and whether the mIoU counts the background
(``evaluate.miou_background``) are :mod:`tskd.metrics`'; both are written into the results.

Output: ``runs/<experiment>/results.json`` (and a copy in this stage's directory): the scores,
the metric conventions, how many labelled images each model saw, the seed, the fingerprints
of the resolved config and of every stage the scores come from, and the quality checks'
verdicts (``checks``; ``continued_past_failed_checks`` names those that failed).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from tskd.artifacts import StageContext, read_manifest, write_json
from tskd.config import fingerprint, to_dict
from tskd.stages.data_stage import load_data

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


@torch.no_grad()
def score_on_originals(model: torch.nn.Module, info: Any, case_ids: list[str], size: int,
                       batch_size: int, *, convention: str = "tskd",
                       miou_background: bool = False,
                       window: int | None = None) -> dict[str, Any]:
    """Score ``model`` on ``case_ids`` at each image's original resolution (the images at
    ``size``, predicted by sliding ``window`` when they are larger than it)."""
    from tskd.data.dataset import SegmentationDataset
    from tskd.data.format import read_case, read_fov
    from tskd.evaluation import window_logits
    from tskd.metrics import SegmentationMetrics

    model.eval()
    metrics = SegmentationMetrics(info.num_classes, class_names=list(info.class_names),
                                  spacing=info.spacing, convention=convention,
                                  miou_background=miou_background)
    dataset = SegmentationDataset(info, case_ids, size)
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        logits = window_logits(model, batch["image"], window)
        for i, case_id in enumerate(batch["id"]):
            _, mask = read_case(info, case_id)
            up = F.interpolate(logits[i:i + 1], size=mask.shape, mode="bilinear",
                               align_corners=False)
            fov = read_fov(info, case_id)
            metrics.spacing = info.spacing_of(case_id)  # dataset.json spacing_per_case
            metrics.update(up.argmax(1), torch.from_numpy(mask)[None],
                           None if fov is None else torch.from_numpy(fov)[None])
    return metrics.aggregate()


def stage_fingerprints(inputs: dict[str, Path]) -> dict[str, str]:
    """Fingerprints of the stages in ``inputs`` (store entries) and, through their manifests'
    ``upstream``, of every stage they were computed from (stage name -> fingerprint)."""
    fps: dict[str, str] = {}
    todo = [(name, Path(d)) for name, d in inputs.items()]
    while todo:
        name, entry = todo.pop()
        if name in fps:
            continue
        manifest = read_manifest(entry) or {}
        fps[name] = manifest.get("fingerprint", "")
        for up, fp in manifest.get("upstream", {}).items():  # the store: <root>/<stage>/<fp>
            todo.append((up, entry.parent.parent / up / fp))
    return dict(sorted(fps.items()))


def model_entry(arch: str, stage_dir: Path) -> dict[str, Any]:
    """``{"arch", "model": {"params", "size_mb", "latency_ms"}}`` of a trained student (or the
    reference), read from its stage's manifest (``student/*`` metrics)."""
    metrics = (read_manifest(stage_dir) or {}).get("metrics", {})
    return {"arch": arch, "model": {k: metrics.get(f"student/{k}")
                                    for k in ("params", "size_mb", "latency_ms")}}


def pretrain_cost(student_stage: Path) -> dict[str, Any] | None:
    """The compute time of the stage a fine-tuned student started from (``distill_<arm>``,
    ``pretrain_<arm>``, ``init_imagenet_mae``; None for scratch), read from its manifest in the
    store: ``{"stage", "wall_time_s", "train_time_s"}`` (``train_time_s``: the training loop
    alone, where the stage reports it)."""
    upstream = (read_manifest(student_stage) or {}).get("upstream", {})
    for name, fp in upstream.items():
        if name == "data":
            continue
        manifest = read_manifest(Path(student_stage).parent.parent / name / fp) or {}
        metrics = manifest.get("metrics", {})
        return {"stage": name, "wall_time_s": manifest.get("wall_time_s"),
                "train_time_s": metrics.get("pretrain/train_time_s")}
    return None


def run(ctx: StageContext) -> dict[str, Any]:
    from tskd.metrics import convention_info
    from tskd.models.footprint import compare_latency
    from tskd.stages.student_finetune import latency_threads, load_student
    from tskd.stages.teacher_finetune import load_finetuned_teacher

    cfg = ctx.cfg
    ev = cfg.evaluate
    info, splits = load_data(ctx.inputs["data"])
    test = list(splits.test)
    size, bs = cfg.data.image_size, ev.batch_size
    opts = {"convention": ev.convention, "miou_background": ev.miou_background,
            "window": cfg.data.patch}
    log.info("evaluating the teacher and %d students on %d test images (%s convention)",
             len(cfg.students), len(test), ev.convention)
    teacher = score_on_originals(load_finetuned_teacher(ctx.inputs["teacher"]), info, test, size,
                                 bs, **opts)
    students = {}
    deployed: dict[str, tuple[torch.nn.Module, int]] = {}  # timed together below
    for arm in cfg.students:
        model = load_student(ctx.inputs[f"student_{arm}"], to_dict(cfg.student),
                             info.num_classes)
        deployed[arm] = (model, cfg.student.img_size)
        students[arm] = score_on_originals(model, info, test, size, bs, **opts) | model_entry(
            cfg.student.arch, ctx.inputs[f"student_{arm}"]) | {
                "pretrain": pretrain_cost(ctx.inputs[f"student_{arm}"])}
    reference = None
    if "reference" in ctx.inputs:
        from tskd.stages.reference import load_reference, reference_student

        model = load_reference(ctx.inputs["reference"], cfg, info.num_classes)
        deployed["reference"] = (model, reference_student(cfg)["img_size"])
        reference = model_entry(cfg.reference.arch, ctx.inputs["reference"]) | score_on_originals(
            model, info, test, size, bs, **opts)
    # CPU latency of every deployable model, in turns, here and now: comparable with each other
    # (the stages' own measurements, in their manifests, saw whatever else ran at the time)
    threads, rounds = latency_threads(cfg.ray), 10
    latency = compare_latency(deployed, threads=threads, rounds=rounds)
    for name, ms in latency.items():
        (reference if name == "reference" else students[name])["model"]["latency_ms"] = ms
    # every model is trained on the labelled split and selected on the validation split
    seen = {"train": len(splits.labelled), "val": len(splits.val),
            "total": len(splits.labelled) + len(splits.val)}
    results = {"experiment": cfg.experiment, "dataset": info.name,
               "classes": {str(k): v for k, v in info.labels.items()},
               "n_test": len(test), "n_labelled": len(splits.labelled),
               "hd95_unit": "mm" if info.has_spacing else "pixels",
               "metrics": convention_info(ev.convention, miou_background=ev.miou_background,
                                          spacing=info.has_spacing),
               "labelled_images": {"teacher": seen, "students": {arm: seen for arm in students}},
               "seed": cfg.seed,
               "config_fingerprint": fingerprint(to_dict(cfg)),
               "stage_fingerprints": stage_fingerprints(ctx.inputs),
               "latency": {"batch": 1, "threads": threads, "rounds": rounds,
                           "measured": "evaluate stage, the students and reference in turns"},
               "teacher": teacher, "students": students}
    if reference is not None:
        results["reference"] = reference
        results["labelled_images"]["reference"] = seen
    from tskd.stages.quality_check import check_results

    checks = check_results(ctx.inputs)
    if checks:  # the quality gates' verdicts; a failed one means check.on_fail was continue
        results["checks"] = checks
        results["continued_past_failed_checks"] = [n for n, v in checks.items()
                                                   if not v["passed"]]
    write_json(ctx.dir / RESULTS_FILE, results)
    write_json(cfg.run_dir / RESULTS_FILE, results)
    summary: dict[str, Any] = {f"teacher/{k}": teacher[k] for k in ("dice", "hd95", "miou")}
    for arm, scores in students.items():
        summary |= {f"{arm}/{k}": scores[k] for k in ("dice", "hd95", "miou")}
    if reference is not None:
        summary |= {f"reference/{k}": reference[k] for k in ("dice", "hd95", "miou")}
    return summary
