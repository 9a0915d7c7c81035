"""Using a finished run (stage layer): Ray Data batch inference and the teacher's export.

* :func:`predict_with_ray`: the items flow through ``ray.data.from_items(...).map_batches`` with
  an actor pool; each actor loads the model once (:func:`tskd.predict.load_model`) and runs
  :func:`tskd.predict.predict_batch` (read, segment, write masks/overlays) on its batches. Ray
  Data's progress bar shows the progress; unreadable images come back as errors, not failures.
* :func:`export_teacher`: the LoRA-tuned teacher of ``runs/<exp>/teacher``, adapters merged,
  as a plain state dict in the official ``segment_anything`` key layout.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tskd.predict import ItemResult, PredictItem

log = logging.getLogger(__name__)


class _PredictActor:
    """Ray Data actor: one loaded model, ``__call__(batch{"id", "path"}) -> {"id", "path", "error"}``."""

    def __init__(self, model_path: str, student: str | None, out_dir: str, overlay: bool,
                 device: str, threads: int | None) -> None:
        import torch

        from tskd.predict import load_model

        if threads:
            torch.set_num_threads(threads)
        self.model = load_model(model_path, student=student, device=device, threads=threads)
        self.out_dir, self.overlay = out_dir, overlay

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from tskd.predict import predict_batch

        items = [PredictItem(str(i), str(p)) for i, p in zip(batch["id"], batch["path"])]
        results = predict_batch(self.model, items, self.out_dir, overlay=self.overlay)
        return {"id": np.array([r.id for r in results]),
                "path": np.array([r.path for r in results]),
                "error": np.array([r.error or "" for r in results])}


def predict_with_ray(model_path: str | Path, items: Sequence[PredictItem], out_dir: str | Path, *,
                     student: str | None = None, batch_size: int = 8, num_actors: int = 2,
                     cpus_per_actor: float = 1.0, overlay: bool = False, device: str = "cpu",
                     threads: int | None = None) -> list[ItemResult]:
    """Segment ``items`` with Ray Data batch inference (needs a started Ray; see the module doc).

    ``out_dir`` must be visible to every node (local disk on one machine, a shared mount on a
    cluster). Returns one :class:`~tskd.predict.ItemResult` per item, in input order.
    """
    import ray

    out_dir = Path(out_dir).resolve()
    ds = ray.data.from_items([asdict(it) for it in items])
    gpus = 1 if device.startswith("cuda") else 0
    ds = ds.map_batches(
        _PredictActor, batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        fn_constructor_args=(str(Path(model_path).resolve()), student, str(out_dir), overlay,
                             device, threads),
        num_cpus=cpus_per_actor, num_gpus=gpus)
    rows = {r["id"]: ItemResult(str(r["id"]), str(r["path"]), str(r["error"]) or None)
            for r in ds.take_all()}
    return [rows.get(it.id, ItemResult(it.id, it.path, "no result from Ray")) for it in items]


def export_teacher(run_dir: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the fine-tuned teacher of ``run_dir`` (LoRA merged) as an official-format SAM
    checkpoint ``out`` plus ``out``'s ``.json`` (arch, classes, input size).

    The checkpoint loads with ``tskd.models.sam.build_sam(arch, num_classes=C, img_size=S,
    checkpoint=out)``; with ``segment_anything.sam_model_registry[arch](checkpoint=out)`` when the
    teacher is an official arch (vit_b/l/h) at 1024 px with 3 classes (the registry builds 3
    multimask outputs at 1024 px and loads strictly).
    """
    from tskd.models.sam import OFFICIAL_IMG_SIZE, OFFICIAL_NUM_MULTIMASK_OUTPUTS, save_sam_checkpoint
    from tskd.predict import ModelError
    from tskd.stages.teacher_finetune import TEACHER_FILE, load_finetuned_teacher

    stage = Path(run_dir).expanduser() / "teacher"
    if not (stage / TEACHER_FILE).is_file():
        raise ModelError(f"{run_dir}: no fine-tuned teacher ({stage / TEACHER_FILE}); expected a "
                         "run directory runs/<experiment> whose teacher stage completed")
    out = Path(out).expanduser()
    if out.suffix not in (".pth", ".pt"):
        raise ModelError(f"{out}: a SAM checkpoint must end in .pth or .pt")
    spec = json.loads((stage / TEACHER_FILE).read_text())
    teacher = load_finetuned_teacher(stage)
    save_sam_checkpoint(teacher.sam, out)
    registry = (spec["arch"] in ("vit_b", "vit_l", "vit_h") and spec["img_size"] == OFFICIAL_IMG_SIZE
                and spec["num_classes"] == OFFICIAL_NUM_MULTIMASK_OUTPUTS)
    info = {"arch": spec["arch"], "num_classes": spec["num_classes"], "img_size": spec["img_size"],
            "lora": spec.get("lora"), "lora_merged": True,
            "loads_with_sam_model_registry": registry,
            "load": f"tskd.models.sam.build_sam({spec['arch']!r}, num_classes="
                    f"{spec['num_classes']}, img_size={spec['img_size']}, checkpoint=PATH)"}
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    if not registry:
        log.warning("%s: arch %s at %d px with %d classes: load it with %s (segment_anything's "
                    "registry only builds vit_b/l/h at 1024 px with 3 mask outputs)", out,
                    spec["arch"], spec["img_size"], spec["num_classes"], info["load"])
    return info
