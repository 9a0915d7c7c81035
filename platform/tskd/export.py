"""Export a fine-tuned student to ONNX or TorchScript, check it, and write its model card (core).

:func:`export_student` writes, for ``OUT`` = ``dir/name.onnx`` (or ``.pt``):

* ``OUT``: the lean inference graph (:class:`~tskd.models.student.StudentInference`): input
  ``images float32 (B, 3, S, S)`` RGB 0..255 with a dynamic batch size, output ``logits (B, C,
  S/4, S/4)``; the metadata (:class:`~tskd.predict.ModelMeta`: input size, normalisation, class
  names, tskd version) rides inside the file (ONNX ``metadata_props['tskd']``, TorchScript extra
  file ``tskd.json``) and beside it as ``dir/name.json``;
* ``dir/name.int8.onnx`` with ``int8=True``: onnxruntime dynamic quantisation (int8 weights of the
  MatMul/Gemm layers);
* ``dir/name.md``: the model card (template ``dashboards/model_card.md``).

The export is checked: the exported model's logits and masks are compared with PyTorch's on
random and realistic inputs (the run's test images, else demo images) at batch sizes 1 and 3;
the largest logit difference is reported and must stay below ``atol``.
"""

from __future__ import annotations

import json
import logging
import math
import string
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tskd.predict import (
    META_KEY,
    ModelError,
    ModelMeta,
    PredictItem,
    Segmenter,
    TorchSegmenter,
    find_inputs,
    load_model,
    load_student_artifact,
    predict_items,
    resolve_student_dir,
    score_predictions,
    to_model_input,
)

__all__ = ["ExportReport", "FORMATS", "export_student", "measure_latency", "quantize_int8",
           "write_model_card", "write_onnx"]

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
OPSET = 17
CARD_TEMPLATE = Path(__file__).resolve().parents[2] / "dashboards" / "model_card.md"


@dataclass
class ExportReport:
    """What :func:`export_student` wrote and measured."""

    path: Path
    format: str
    max_logit_diff: float
    mask_agreement: float
    """Fraction of pixels whose label equals PyTorch's (random and realistic inputs)."""
    size_mb: float
    latency_ms: float
    """Median CPU latency at batch 1 of the exported model (incl. pre-/post-processing)."""
    files: list[Path] = field(default_factory=list)
    int8_path: Path | None = None
    int8_max_logit_diff: float | None = None
    int8_latency_ms: float | None = None
    dice: dict[str, float] = field(default_factory=dict)
    """Mean test Dice of ``fp32`` (the exported model) and ``int8`` where the dataset is here."""


def _run_context(stage_dir: Path) -> dict[str, Any]:
    """What the run around a student stage says: config, results, splits (each may be absent)."""
    def read(path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
    run_dir = stage_dir.parent
    return {"manifest": read(stage_dir / "manifest.json"), "results": read(run_dir / "results.json"),
            "splits": read(run_dir / "data" / "splits.json"),
            "arm": "reference" if stage_dir.name == "reference" or read(
                stage_dir / "manifest.json").get("stage") == "reference"
            else stage_dir.name[len("student_"):]}


def describe_student(cfg: dict[str, Any]) -> str:
    """One line naming a student config's architecture (model card, ONNX doc string)."""
    arch = cfg.get("arch", "vit")
    return {"vit": f"timm `{cfg.get('model_name', 'n/a')}` + FPN head (patch "
                   f"{cfg.get('patch_size', 'n/a')})",
            "timm_unet": f"timm `{cfg.get('encoder', 'n/a')}` encoder + MONAI U-Net decoder",
            "basic_unet": "MONAI `BasicUNet`",
            "segresnet": "MONAI `SegResNet` (5 levels)"}.get(arch, f"`{arch}`")


def _test_set(ctx: dict[str, Any]) -> tuple[Any, list[PredictItem]] | None:
    """The run's dataset and its test split, if the dataset is on this machine."""
    splits = ctx["splits"]
    if not splits.get("root") or not splits.get("test"):
        return None
    try:
        items, info = find_inputs(splits["root"])
    except (OSError, ValueError):
        return None
    test = set(splits["test"])
    items = [it for it in items if it.id in test]
    return (info, items) if info is not None and items else None


def _check_inputs(meta: ModelMeta, test: tuple[Any, list[PredictItem]] | None) -> np.ndarray:
    """Random inputs (uniform 0..255) and realistic ones (test or demo images), ``(6, 3, S, S)``."""
    from tskd.data.demo import make_demo_case
    from tskd.data.format import read_image

    rng = np.random.default_rng(0)
    rand = rng.uniform(0, 255, (3, 3, meta.img_size, meta.img_size)).astype(np.float32)
    if test is not None:
        real = [read_image(it.path) for it in test[1][:3]]
    else:
        real = [make_demo_case(seed, size=meta.img_size)[0] for seed in range(3)]
    real = [np.repeat(r[..., None], 3, 2) if r.ndim == 2 else r for r in real]
    return np.concatenate([rand, to_model_input(real, meta.img_size)])


def _compare(reference: Segmenter, exported: Segmenter, x: np.ndarray) -> tuple[float, float]:
    """Largest |logit difference| and label agreement, at batch sizes 1 and ``len(x) - 1``."""
    diffs, agree = [], []
    for batch in (x[:1], x[1:]):
        a, b = reference.logits(batch), exported.logits(batch)
        if a.shape != b.shape:
            raise RuntimeError(f"exported model gives logits {b.shape}, PyTorch {a.shape}")
        diffs.append(float(np.abs(a - b).max()))
        agree.append(float((a.argmax(1) == b.argmax(1)).mean()))
    return max(diffs), float(np.mean(agree))


def measure_latency(model: Segmenter, *, size: int | None = None, batch: int = 1,
                    repeats: int = 10) -> float:
    """Median seconds per call of ``model`` on random ``(batch, 3, S, S)`` input (one warm-up)
    including pre-processing from a ``size``-px uint8 image and post-processing to its labels."""
    from tskd.predict import labels_from_logits

    size = size or model.meta.img_size
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(batch)]

    def once() -> None:
        logits = model.logits(to_model_input(images, model.meta.img_size))
        for lg in logits:
            labels_from_logits(lg, (size, size))

    once()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def write_onnx(wrapper: torch.nn.Module, example: torch.Tensor, out: Path,
               meta: ModelMeta) -> None:
    """Export ``wrapper`` (a :class:`~tskd.models.student.StudentInference`) to ``out`` with a
    dynamic batch axis and ``meta`` in ``metadata_props``."""
    import onnx

    torch.onnx.export(wrapper, (example,), str(out), input_names=["images"],
                      output_names=["logits"], opset_version=OPSET, dynamo=False,
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    _set_onnx_meta(out, meta)
    onnx.checker.check_model(str(out))


def _set_onnx_meta(path: Path, meta: ModelMeta) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta.to_dict())
    model.doc_string = f"tskd student ({describe_student(meta.student)}, {meta.img_size} px)"
    onnx.save(model, str(path))


def quantize_int8(src: Path, dst: Path, meta: ModelMeta) -> Path:
    """onnxruntime dynamic quantisation of the MatMul/Gemm layers (the ViT's linear layers: int8
    weights, activations quantised at run time); convolutions stay fp32 (ConvInteger is slower
    than fp32 Conv on CPU in onnxruntime). The conv students (``timm_unet`` but its MobileViT
    encoders' attention, ``basic_unet``, ``segresnet``) have no such layer: their int8 file is
    the fp32 graph (logged)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ops = [n.op_type for n in onnx.load(str(src), load_external_data=False).graph.node]
    n_linear = sum(op in ("MatMul", "Gemm") for op in ops)
    log.info("int8: %d MatMul/Gemm layers quantised, %d Conv layers stay fp32", n_linear,
             ops.count("Conv"))
    if not n_linear:
        log.warning("int8: %s has no MatMul/Gemm layer (a conv student): nothing is quantised",
                    src.name)

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul", "Gemm"])
    _set_onnx_meta(dst, meta)
    return dst


def _score(model: Segmenter, test: tuple[Any, list[PredictItem]]) -> float:
    info, items = test
    with tempfile.TemporaryDirectory() as tmp:
        predict_items(model, items, tmp, progress_every=10**9)
        return float(score_predictions(info, [it.id for it in items], tmp)["dice"])


def export_student(model_path: str | Path, fmt: str, out: str | Path, *,
                   student: str | None = None, int8: bool = False, atol: float = 1e-3,
                   card: bool = True) -> ExportReport:
    """Export the student of ``model_path`` (a run dir, student stage dir or ``student.pt``).

    Raises :class:`~tskd.predict.ModelError` for a model that is not a PyTorch student, a bad
    format/extension, or an export whose logits differ from PyTorch's by more than ``atol``.
    """
    from tskd.models.student import StudentInference

    if fmt not in FORMATS:
        raise ModelError(f"--format: invalid value {fmt!r}; allowed: {', '.join(FORMATS)}")
    model_path, out = Path(model_path).expanduser(), Path(out).expanduser()
    want = ".onnx" if fmt == "onnx" else ".pt"
    if out.suffix != want:
        raise ModelError(f"{out}: a {fmt} export must end in {want}")
    if int8 and fmt != "onnx":
        raise ModelError("--int8: dynamic quantisation is done by onnxruntime; use --format onnx")
    if model_path.is_file() and model_path.suffix not in (".pt", ".pth"):
        raise ModelError(f"{model_path}: export needs the PyTorch student (a run directory, a "
                         f"student_<arm> directory or its student.pt), not a {model_path.suffix} file")
    stage = resolve_student_dir(model_path, student) if model_path.exists() else None
    if stage is None:
        raise ModelError(f"{model_path}: no such run directory or student file")
    net, meta = load_student_artifact(model_path if model_path.is_file() else stage)
    wrapper = StudentInference(net).eval()
    reference = TorchSegmenter(wrapper, meta, stage)
    example = torch.rand(2, 3, meta.img_size, meta.img_size) * 255
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        write_onnx(wrapper, example, out, meta)
    else:
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, (example,))
        torch.jit.save(traced, str(out), _extra_files={f"{META_KEY}.json": json.dumps(meta.to_dict())})
    sidecar = out.with_suffix(".json")
    sidecar.write_text(json.dumps(meta.to_dict(), indent=2) + "\n")

    ctx = _run_context(stage)
    test = _test_set(ctx)
    x = _check_inputs(meta, test)
    exported = load_model(out)
    diff, agreement = _compare(reference, exported, x)
    log.info("%s export: largest logit difference to PyTorch %.2e, label agreement %.6f",
             fmt, diff, agreement)
    if not diff <= atol:
        raise ModelError(f"{out}: exported logits differ from PyTorch by {diff:.3g} > {atol}")
    report = ExportReport(path=out, format=fmt, max_logit_diff=diff, mask_agreement=agreement,
                          size_mb=out.stat().st_size / 2**20,
                          latency_ms=measure_latency(exported) * 1e3, files=[out, sidecar])
    if int8:
        q_path = quantize_int8(out, out.with_suffix(".int8.onnx"), meta)
        quantised = load_model(q_path)
        report.int8_path = q_path
        report.int8_max_logit_diff, _ = _compare(reference, quantised, x)
        report.int8_latency_ms = measure_latency(quantised) * 1e3
        report.files.append(q_path)
        if test is not None:
            report.dice = {"fp32": _score(exported, test), "int8": _score(quantised, test)}
            log.info("test Dice fp32 %.4f, int8 %.4f (change %+.4f) on %d images",
                     report.dice["fp32"], report.dice["int8"],
                     report.dice["int8"] - report.dice["fp32"], len(test[1]))
        else:
            log.warning("the run's dataset is not here: int8 Dice change not measured")
    if card:
        report.files.append(write_model_card(report, meta, ctx, out.with_suffix(".md")))
    return report


# ----------------------------------------------------------------------------------------------
# model card
# ----------------------------------------------------------------------------------------------

_CONVENTIONS = ("Dice, HD95 and IoU per image and class; a class empty in both prediction and "
                "ground truth is not counted, empty in exactly one gives Dice 0, IoU 0 and HD95 "
                "= the image diagonal; means over images per class, then over foreground classes.")


def _fmt(value: Any, spec: str = ".4f") -> str:
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        return format(value, spec)
    return "n/a"


def _metrics_table(scores: dict[str, Any], unit: str) -> str:
    per_class = scores.get("per_class") or {}
    if not per_class:
        return "_no test results in this run (results.json missing)_"
    lines = [f"| class | Dice | HD95 ({unit}) | IoU |", "| --- | --- | --- | --- |"]
    for name, s in per_class.items():
        lines.append(f"| {name} | {_fmt(s.get('dice'))} | {_fmt(s.get('hd95'), '.2f')} | "
                     f"{_fmt(s.get('miou'))} |")
    lines.append(f"| **mean (foreground)** | {_fmt(scores.get('dice'))} | "
                 f"{_fmt(scores.get('hd95'), '.2f')} | {_fmt(scores.get('miou'))} |")
    return "\n".join(lines)


def write_model_card(report: ExportReport, meta: ModelMeta, ctx: dict[str, Any],
                     path: Path) -> Path:
    """Fill ``dashboards/model_card.md`` from the run's manifest, results and splits."""
    cfg = ctx["manifest"].get("config") or {}
    results, splits, arm = ctx["results"], ctx["splits"], ctx["arm"]
    data, teacher = cfg.get("data") or {}, cfg.get("teacher") or {}
    distill = cfg.get("distill") or {}
    scores = (results.get("students") or {}).get(arm) or {}
    conventions = results.get("metric_conventions") or _CONVENTIONS
    if isinstance(conventions, dict):
        conventions = "; ".join(f"{k}: {v}" for k, v in conventions.items())
    n = {k: len(splits.get(k) or []) for k in ("labelled", "val", "test", "unlabelled")}
    if arm == "reference":
        scores = results.get("reference") or {}
    kd = ("none (trained from random initialisation on the labels only)"
          if arm in ("scratch", "reference") else
          f"arm `{arm}`: logit MSE weight {distill.get('w_logits', 'n/a')}, hidden MSE weight "
          f"{distill.get('w_hidden', 'n/a')}" + (" (task-agnostic: hidden term only)"
                                                 if arm == "ta_kd" else "")
          + f", {distill.get('epochs', 'n/a')} epochs on the transfer set "
          f"({(cfg.get('transfer') or {}).get('n_images', 'n/a')} synthetic images)")
    baseline = {"imagenet_mae": "ViT initialised from an ImageNet MAE checkpoint "
                                f"({(cfg.get('imagenet_mae') or {}).get('checkpoint', 'n/a')})",
                "mae": f"MAE pre-training on the transfer set, "
                       f"{(cfg.get('mae') or {}).get('epochs', 'n/a')} epochs",
                "mocov3": f"MoCo v3 pre-training on the transfer set, "
                          f"{(cfg.get('mocov3') or {}).get('epochs', 'n/a')} epochs"}
    if arm in baseline:  # not distilled: the paper's other initialisations
        kd = f"none; arm `{arm}`: {baseline[arm]}, then fine-tuned on the labels"
    int8 = "not exported"
    if report.int8_path is not None:
        dice = report.dice
        change = (f"test Dice {dice['fp32']:.4f} → {dice['int8']:.4f} "
                  f"({dice['int8'] - dice['fp32']:+.4f})" if dice else
                  "test Dice change not measured (dataset not available at export)")
        int8 = (f"`{report.int8_path.name}`, {report.int8_path.stat().st_size / 2**20:.1f} MB, "
                f"{report.int8_latency_ms:.1f} ms; largest logit difference to fp32 "
                f"{report.int8_max_logit_diff:.3g}; {change}")
    values = {
        "title": f"{results.get('experiment', 'tskd')} — student `{arm}`",
        "file": report.path.name, "format": report.format,
        "tskd_version": meta.tskd_version,
        "model": describe_student(meta.student),
        "img_size": meta.img_size, "logits_size": meta.img_size // meta.logits_stride,
        "classes": ", ".join(f"{i}: {c}" for i, c in enumerate(meta.class_names)),
        "mean": ", ".join(f"{v:.3f}" for v in meta.pixel_mean),
        "std": ", ".join(f"{v:.3f}" for v in meta.pixel_std),
        "dataset": results.get("dataset") or splits.get("name") or "n/a",
        "n_labelled": n["labelled"] or results.get("n_labelled", "n/a"),
        "n_val": n["val"], "n_test": n["test"] or results.get("n_test", "n/a"),
        "n_unlabelled": n["unlabelled"], "label_budget": data.get("n_labels", "n/a"),
        "teacher_arch": teacher.get("arch", "n/a"), "teacher_img_size": teacher.get("img_size", "n/a"),
        "teacher_checkpoint": teacher.get("checkpoint") or "pre-trained by tskd (demo)",
        "lora_rank": (teacher.get("lora") or {}).get("rank", "n/a"),
        "kd": kd, "metrics": _metrics_table(scores, results.get("hd95_unit", "pixels")),
        "teacher_dice": _fmt(((results.get("teacher") or {}).get("dice"))),
        "conventions": conventions, "size_mb": f"{report.size_mb:.1f}",
        "latency_ms": f"{report.latency_ms:.1f}", "threads": torch.get_num_threads(),
        "max_diff": f"{report.max_logit_diff:.3g}",
        "agreement": f"{report.mask_agreement:.6f}", "int8": int8,
    }
    text = string.Template(CARD_TEMPLATE.read_text()).safe_substitute(values)
    path.write_text(text)
    return path
