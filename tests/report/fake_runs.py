"""Fake run directories for the report tests (used by conftest.py), written by hand in the
exact layout `tskd run` leaves: ``<root>/store/<stage>/<fp>/manifest.json`` entries, each
run's ``stages.json`` (and stage links) and ``results.json`` as ``tskd.stages.evaluate``
writes it, a tiny demo dataset behind the data stage, students and a reference copied in where
a test gives them, a transfer set in Ray's parquet tensor layout, failed and unfinished runs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

CLASSES = {"0": "background", "1": "organ", "2": "lesion"}
ARMS = ("ts_kd", "ta_kd", "scratch")
BASE = {"teacher": 0.70, "scratch": 0.50, "ta_kd": 0.55, "ts_kd": 0.60, "reference": 0.58}
STUDENT_CFG = {"arch": "vit", "encoder": "resnet18", "model_name": "test_vit", "img_size": 32,
               "patch_size": 16, "decoder_dim": 16}
REFERENCE_CFG = {"arch": "basic_unet", "encoder": "resnet18", "img_size": None, "epochs": 2,
                 "batch_size": 8, "lr": 0.001, "weight_decay": 0.0001, "warmup_epochs": 1.0}
IMAGE_SIZE = 32


def fake_scores(model: str, labels: int, size: int | None, seed: int) -> dict[str, Any]:
    """Deterministic, distinct scores per model, budget, transfer size and seed."""
    k = list(BASE).index(model)
    noise = 0.004 * ((seed * (k + 2) + k) % 7)  # differs per model and seed
    base = BASE[model] + labels / 1000 + (size or 0) / 10000 + 0.013 * seed + noise
    per = {"organ": {"dice": base + 0.05, "hd95": 10 * (1.2 - base), "miou": base - 0.1},
           "lesion": {"dice": base - 0.05, "hd95": 10 * (1.4 - base), "miou": base - 0.2}}
    mean = {k: (per["organ"][k] + per["lesion"][k]) / 2 for k in ("dice", "hd95", "miou")}
    return mean | {"per_class": per, "n_images": 3}


def wall(stage: str, labels: int, size: int | None, seed: int) -> float:
    return round(10 + len(stage) + labels / 10 + (size or 0) / 100 + 0.5 * seed, 3)


class FakeGrid:
    """Writes runs under ``root`` (sharing ``root/store``)."""

    def __init__(self, root: Path, dataset: Path) -> None:
        self.root, self.dataset = root, dataset
        self.store = root / "store"

    def entry(self, stage: str, fp: str, *, upstream: dict[str, str], seed: int,
              stage_config: dict[str, Any], metrics: dict[str, Any], wall_time: float,
              experiment: str) -> Path:
        path = self.store / stage / fp
        path.mkdir(parents=True, exist_ok=True)
        (path / "manifest.json").write_text(json.dumps({
            "stage": stage, "fingerprint": fp, "upstream": upstream, "seed": seed, "params": {},
            "stage_config": stage_config, "config": self.config | {"experiment": experiment},
            "wall_time_s": wall_time, "metrics": metrics, "status": "complete",
            "content_hash": f"hash-{fp}"}))
        return path

    def run(self, name: str, *, labels: int, size: int, seed: int, reference: bool = True,
            students: dict[str, Path] | None = None, fail_stage: str | None = None,
            stop_at: str | None = None) -> Path:
        """One cell; ``students``: arm -> a student.pt to copy into its stage (else none);
        ``fail_stage``: stop before that stage and leave its error log; ``stop_at``: stop
        before that stage without an error (a run still going, or a ``--only`` run)."""
        run_dir = self.root / name
        run_dir.mkdir(parents=True)
        self.config = {"students": list(ARMS), "seed": seed, "data": {"n_labels": labels},
                       "transfer": {"n_images": size}}
        entries: dict[str, Path] = {}
        fps: dict[str, str] = {}

        def add(stage: str, fp: str, upstream: tuple[str, ...], stage_config: dict[str, Any],
                metrics: dict[str, Any] | None = None, size_axis: int | None = None) -> bool:
            if stage == stop_at:
                return False
            if stage == fail_stage:
                (run_dir / f"{stage}.error.log").write_text(
                    "Traceback (most recent call last):\n  File \"x.py\", line 1, in run\n"
                    "tskd.stages.transfer_set.TransferSetError: every one of the 8 synthetic "
                    "images is a near-copy of a training image\n")
                return False
            fps[stage] = fp
            entries[stage] = self.entry(
                stage, fp, upstream={u: fps[u] for u in upstream}, seed=seed,
                stage_config=stage_config, metrics=metrics or {},
                wall_time=wall(stage, labels, size_axis, seed), experiment=name)
            return True

        sfx = f"l{labels}-s{seed}"
        ok = add("data", f"data-{sfx}", (),
                 {"data": {"n_labels": labels, "root": str(self.dataset)}})
        (entries["data"] / "splits.json").write_text(json.dumps(self.splits(labels)))
        ok &= add("teacher", f"teacher-{sfx}", ("data",),
                  {"arch": "sam_demo", "img_size": 32, "checkpoint": None,
                   "lora": {"rank": 4, "alpha": None, "dropout": 0.0}},
                  {"teacher/adapter_mb": 1.25 + labels / 1000})
        ok = ok and add("ddpm", f"ddpm-{sfx}", ("data",),  # one DDPM for every size
                        {"diffusion": {"train_steps": 800}, "image_size": IMAGE_SIZE},
                        {"diffusion/final_loss": 0.05})
        ok = ok and add("transfer", f"transfer-{sfx}-t{size}", ("data", "ddpm"),
                        {"transfer": {"n_images": size}, "image_size": IMAGE_SIZE},
                        {"transfer/n_images": size}, size)
        if ok:
            self.transfer_files(entries["transfer"], size)
        for arm in ARMS if ok else ():
            deps: tuple[str, ...] = ("data",)
            if arm != "scratch":
                tdeps = ("data", "teacher", "transfer") if arm == "ts_kd" else ("data", "transfer")
                add(f"distill_{arm}", f"d{arm}-{sfx}-t{size}", tdeps,
                    {"student": STUDENT_CFG, "distill": {"w_logits": 0.2, "w_hidden": 0.1,
                     "logits_loss": "mse", "logits_target": "interpolated"}}, {}, size)
                deps = ("data", f"distill_{arm}")
            fp = f"s{arm}-{sfx}" + ("" if arm == "scratch" else f"-t{size}")
            add(f"student_{arm}", fp, deps, {"student": STUDENT_CFG, "finetune": {"epochs": 1}},
                {"student/params": 323939, "student/size_mb": 1.3, "student/latency_ms": 2.5},
                None if arm == "scratch" else size)
            if students and arm in students:
                (entries[f"student_{arm}"] / "student.pt").write_bytes(students[arm].read_bytes())
        if ok and reference:
            add("reference", f"ref-{sfx}", ("data",), {"reference": REFERENCE_CFG,
                                                        "image_size": IMAGE_SIZE},
                {"student/params": 1979075, "student/size_mb": 7.9, "student/latency_ms": 9.0})
            if students and "reference" in students:
                (entries["reference"] / "student.pt").write_bytes(
                    students["reference"].read_bytes())
        if ok:
            add("evaluate", f"eval-{name}", ("data", "teacher", *[f"student_{a}" for a in ARMS]),
                {"evaluate": {}})
            results = self.results(name, labels, size, seed, fps, reference)
            (run_dir / "results.json").write_text(json.dumps(results))
        view = {"stages": {s: {"fingerprint": fps[s], "content_hash": f"hash-{fps[s]}",
                               "entry": os.path.relpath(e, run_dir), "used": ""}
                           for s, e in entries.items()}}
        (run_dir / "stages.json").write_text(json.dumps(view))
        for s, e in entries.items():
            (run_dir / s).symlink_to(os.path.relpath(e, run_dir))
        return run_dir

    def splits(self, labels: int) -> dict[str, Any]:
        ids = sorted(p.stem for p in (self.dataset / "images").iterdir())
        return {"root": str(self.dataset), "name": "fake", "labels": CLASSES,
                "labelled": ids[:4], "val": ids[4:5], "test": ids[5:], "unlabelled": [],
                "n_labels": labels}

    def transfer_files(self, entry: Path, size: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        n = 4
        rng = np.random.default_rng(size)
        images = rng.integers(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        field = pa.field("image", pa.large_list(pa.uint8()), metadata={
            b"ARROW:extension:name": b"ray.data.arrow_tensor_v2",
            b"ARROW:extension:metadata": json.dumps([IMAGE_SIZE, IMAGE_SIZE, 3]).encode()})
        flat = pa.array([img.reshape(-1) for img in images], type=pa.large_list(pa.uint8()))
        table = pa.table({"id": pa.array(np.arange(n), pa.int64()), "image": flat,
                          "nn_index": pa.array([0, 1, 2, 0], pa.int64()),
                          "nn_mse": pa.array([900.0, 800.0, 700.0, 600.0]),
                          "nn_psnr": pa.array([18.5, 19.0, 19.7, 20.3]),
                          "nn_kind": pa.array(["train", "hflip", "augmented", "train"]),
                          "source": pa.array(["synthetic"] * n)},
                         schema=pa.schema([pa.field("id", pa.int64()), field,
                                           pa.field("nn_index", pa.int64()),
                                           pa.field("nn_mse", pa.float64()),
                                           pa.field("nn_psnr", pa.float64()),
                                           pa.field("nn_kind", pa.string()),
                                           pa.field("source", pa.string())]))
        (entry / "images").mkdir(exist_ok=True)
        pq.write_table(table, entry / "images" / "shard_0.parquet")
        stats = {"mean": 19.375 + size / 1e4, "median": 19.35, "min": 18.5, "max": 20.3,
                 "std": 0.67}
        mse = {"mean": 750.0, "median": 750.0, "min": 600.0, "max": 900.0, "std": 111.8}
        (entry / "quality.json").write_text(json.dumps({
            "all": {"n": n, "mse": mse, "psnr": stats, "n_exact_copies": 0,
                    "near_copy_psnr": 30.0, "n_near_copies": 0, "near_copies": []},
            "kept": {"n": n, "mse": mse, "psnr": stats, "n_exact_copies": 0,
                     "near_copy_psnr": 30.0, "n_near_copies": 0},
            "n_sampled": n, "n_kept": n, "n_dropped": 0, "drop_near_copies": True,
            "sources": ["synthetic"], "compared_against": "fake",
            "nearest_kind_counts": {"augmented": 1, "hflip": 1, "train": 2},
            "train_case_ids": self.splits(0)["labelled"]}))
        (entry / "transfer.json").write_text(json.dumps({"image_size": IMAGE_SIZE, "n_kept": n}))

    def results(self, name: str, labels: int, size: int, seed: int, fps: dict[str, str],
                reference: bool) -> dict[str, Any]:
        seen = {"train": 4, "val": 1, "total": 5}
        students = {}
        for arm in ARMS:
            students[arm] = fake_scores(arm, labels, None if arm == "scratch" else size, seed) | {
                "arch": "vit", "model": {"params": 323939, "size_mb": 1.3, "latency_ms": 2.5}}
        out = {"experiment": name, "dataset": "fake-us", "classes": CLASSES, "n_test": 3,
               "n_labelled": 4, "hd95_unit": "mm",
               "metrics": {"convention": "tskd", "empty_masks": "…", "averaging": "…",
                           "hd95": "medpy", "hd95_unit": "mm",
                           "miou_includes_background": False},
               "labelled_images": {"teacher": seen, "students": {a: seen for a in ARMS}},
               "seed": seed, "config_fingerprint": f"cfg-{name}",
               "stage_fingerprints": dict(sorted(fps.items())),
               "teacher": fake_scores("teacher", labels, None, seed), "students": students}
        if reference:
            out["reference"] = {"arch": "basic_unet", "model": {
                "params": 1979075, "size_mb": 7.9, "latency_ms": 9.0}} | fake_scores(
                    "reference", labels, None, seed)
            out["labelled_images"]["reference"] = seen
        return out
