"""Segment images with a trained or exported student (core: plain PyTorch + onnxruntime).

A *model* is one of

* a run directory ``runs/<experiment>`` (the student with the best test Dice in ``results.json``,
  or the arm named by ``student=``),
* a student stage directory ``runs/<experiment>/student_<arm>`` or its ``student.pt`` (the stage's
  ``manifest.json`` holds the resolved config the student is rebuilt from),
* an exported file: ``.onnx`` (run by onnxruntime) or a TorchScript ``.pt`` written by
  :mod:`tskd.export` (its metadata travels inside the file).

Every model is used the same way (:class:`Segmenter`): images are resized (antialiased bilinear)
to the model's input size, the model returns low-resolution logits, and the logits are upsampled
bilinearly to each image's own size before the argmax — the same computation as
``Student.forward(images).logits.argmax(1)`` (see :class:`tskd.models.student.StudentInference`).
A student trained on patches (``ModelMeta.window``) sees each image resized to the training
working size (``ModelMeta.working_size``) window by window instead (MONAI's sliding window,
Gaussian blending: :func:`windowed_logits`, as the ``evaluate`` stage scores it).

Outputs of :func:`predict_items`: ``OUT/masks/<id>.png`` (uint8 label values ``0..C-1``, at the
input's size) and, with ``overlay=True``, ``OUT/overlays/<id>.png`` (the image with the classes
tinted). Unreadable images are reported by name and skipped; they never abort a batch.
"""

from __future__ import annotations

import json
import logging
import math
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tskd.artifacts import tskd_version
from tskd.data.format import (
    DATASET_JSON,
    IMAGE_EXTENSIONS,
    DatasetInfo,
    load_dataset_info,
    read_fov,
    read_image,
    read_mask,
)

__all__ = [
    "ItemResult", "ModelError", "ModelMeta", "PredictItem", "Segmenter", "find_inputs",
    "labels_from_logits", "load_model", "load_student_artifact", "overlay_image", "predict_batch",
    "predict_items", "score_predictions", "student_meta", "test_split_ids", "to_model_input", "tskd_version",
    "windowed_logits",
]

log = logging.getLogger(__name__)

STUDENT_FILE = "student.pt"
"""File name of a student stage's weights (the same as ``tskd.stages.distill.STUDENT_FILE``)."""
META_KEY = "tskd"
"""Name of the metadata entry in an ONNX file's ``metadata_props`` and a TorchScript file's
extra files (``tskd.json``)."""
MASKS_DIR, OVERLAYS_DIR = "masks", "overlays"
EXPECTED_MODELS = ("a run directory runs/<experiment>, a student_<arm> stage directory or its "
                   "student.pt, an exported .onnx file or a TorchScript .pt from `tskd export`")

#: Overlay colours per class (class 0, the background, is left untinted).
PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                    [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230],
                    [210, 245, 60], [250, 190, 212], [0, 128, 128]], dtype=np.uint8)


class ModelError(ValueError):
    """A model path is missing or of the wrong kind; the message names it and what is expected."""


@dataclass(frozen=True)
class ModelMeta:
    """What a model needs around it: input size, normalisation, classes, provenance.

    ``pixel_mean``/``pixel_std`` are on the 0..255 scale (the model applies them itself);
    ``student`` is the student config (``arch`` and what it reads: ``model_name``, ``img_size``,
    ``patch_size``, ``decoder_dim``, ``head_stride``, ``encoder``); ``logits_stride`` is the
    ratio of input size to logits size (1: full-size logits).
    """

    img_size: int
    num_classes: int
    class_names: list[str]
    pixel_mean: list[float]
    pixel_std: list[float]
    logits_stride: int
    student: dict[str, Any] = field(default_factory=dict)
    tskd_version: str = field(default_factory=tskd_version)
    source: str = ""
    working_size: int | None = None
    """A student trained on patches: the ``data.image_size`` images are resized to before
    they are predicted window by window (None: whole images, resized to ``img_size``)."""
    window: int | None = None
    """Its ``data.patch_size``: the sliding window's side (None: whole images)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> ModelMeta:
        try:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except TypeError as e:
            raise ModelError(f"{where}: tskd metadata incomplete ({e})") from None


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------


class Segmenter:
    """A loaded model: ``logits(images float32 (B, 3, S, S) 0..255) -> float32 (B, C, S/s, S/s)``
    with ``S = meta.img_size`` and ``s = meta.logits_stride``."""

    kind = "abstract"

    def __init__(self, meta: ModelMeta, source: Path) -> None:
        self.meta, self.source = meta, source

    def logits(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source}, {self.meta.img_size} px, " \
               f"{self.meta.num_classes} classes)"


class TorchSegmenter(Segmenter):
    """A :class:`~tskd.models.student.StudentInference` or TorchScript module."""

    kind = "pytorch"

    def __init__(self, module: torch.nn.Module, meta: ModelMeta, source: Path, *,
                 device: str = "cpu", kind: str = "pytorch") -> None:
        super().__init__(meta, source)
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.kind = kind

    @torch.inference_mode()
    def logits(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
        return self.module(x).float().cpu().numpy()


class OnnxSegmenter(Segmenter):
    """An exported ``.onnx`` model run by onnxruntime (input ``images``, output ``logits``)."""

    kind = "onnx"

    def __init__(self, path: Path, meta: ModelMeta, *, device: str = "cpu",
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        super().__init__(meta, path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ModelError(f"{path}: --device {device} needs onnxruntime-gpu "
                                 "(CUDAExecutionProvider); this onnxruntime has "
                                 f"{ort.get_available_providers()}")
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, images: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(images, dtype=np.float32)
        return self.session.run(None, {self.input_name: x})[0]


def _class_names_near(stage_dir: Path, num_classes: int) -> list[str]:
    """Class names from the run's ``data/splits.json`` or ``results.json`` (else ``class_i``)."""
    run_dir = stage_dir.parent
    for path, key in ((run_dir / "data" / "splits.json", "labels"),
                      (run_dir / "results.json", "classes")):
        try:
            labels = json.loads(path.read_text()).get(key) or {}
        except (OSError, json.JSONDecodeError):
            continue
        names = [labels.get(str(c)) for c in range(num_classes)]
        if all(isinstance(n, str) for n in names):
            return names
    return [f"class_{c}" for c in range(num_classes)]


REFERENCE_STAGE = "reference"
"""Name of the label-only reference's stage (``tskd.stages.reference``): its ``student.pt`` is
read like a student's, its arch from ``config.reference``."""


def _stage_student_config(manifest: dict[str, Any], stage_dir: Path) -> dict[str, Any]:
    """The student config (a ``StudentConfig`` as a dict, defaults filled in) a stage trained.

    A ``student_<arm>`` stage: the manifest's ``config.student``. The ``reference`` stage:
    ``config.reference`` as :meth:`tskd.config.ReferenceConfig.student` makes it (its
    ``img_size``, else the data's patch / image size)."""
    from tskd.config import DataConfig, StudentConfig, to_dict

    config = manifest["config"]
    if manifest.get("stage", stage_dir.name) == REFERENCE_STAGE:
        ref = config["reference"]
        img_size = ref.get("img_size")
        if img_size is None:
            data = config.get("data") or {}
            img_size = DataConfig(**{k: v for k, v in data.items() if k in (
                "image_size", "max_image_size", "patch_size") and v is not None}).patch
        return to_dict(StudentConfig(arch=ref["arch"], encoder=ref.get("encoder", "resnet18"),
                                     img_size=int(img_size)))
    return {**to_dict(StudentConfig()), **config["student"]}


def _key_problems(expected: dict[str, torch.Tensor], sd: dict[str, Any]) -> str:
    """Missing / unexpected / mis-shaped keys of ``sd`` against ``expected`` ('' if none)."""
    def few(keys: list[str]) -> str:
        return f"{keys[:5]}" + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = sorted(f"{k}: {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}"
                    for k in set(expected) & set(sd)
                    if getattr(sd[k], "shape", None) != expected[k].shape)
    parts = [f"missing keys {few(missing)}"] * bool(missing) \
        + [f"unexpected keys {few(unexpected)}"] * bool(unexpected) \
        + [f"shape mismatch {few(shapes)}"] * bool(shapes)
    return "; ".join(parts)


def load_student_artifact(path: str | Path) -> tuple[torch.nn.Module, ModelMeta]:
    """The fine-tuned student of a ``student_<arm>`` (or ``reference``) stage: its directory or
    ``student.pt``.

    Every ``student.arch`` of :data:`tskd.models.students.STUDENT_ARCHS` is rebuilt by
    :func:`~tskd.models.students.build_student` from the stage manifest's config; the number of
    classes is read from the arch's last convolution
    (:data:`~tskd.models.students.CLASS_WEIGHT_KEYS`). Returns the model in eval mode and its
    :class:`ModelMeta`. Raises :class:`ModelError` naming the file (and the arch and the keys
    that do not fit) when the weights or the manifest do not fit.
    """
    from tskd.models.students import CLASS_WEIGHT_KEYS, STUDENT_ARCHS, build_student

    path = Path(path)
    weights = path / STUDENT_FILE if path.is_dir() else path
    manifest_path = weights.parent / "manifest.json"
    try:
        cfg = _stage_student_config(json.loads(manifest_path.read_text()), weights.parent)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ModelError(f"{weights}: a student state dict needs its stage's manifest.json "
                         f"(with config.student, or config.reference for the reference stage) "
                         f"beside it; {manifest_path} is missing or unreadable") from None
    arch = cfg["arch"]
    if arch not in STUDENT_ARCHS:
        raise ModelError(f"{manifest_path}: student.arch {arch!r} is not one this tskd builds "
                         f"({list(STUDENT_ARCHS)})")
    try:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure: wrong kind of file
        raise ModelError(f"{weights}: not a torch state dict ({type(e).__name__}); expected "
                         + EXPECTED_MODELS) from None
    if not isinstance(sd, dict):
        raise ModelError(f"{weights}: holds a {type(sd).__name__}, not a tskd student state dict;"
                         " expected " + EXPECTED_MODELS)
    head = CLASS_WEIGHT_KEYS[arch]
    num_classes = int(sd[head].shape[0]) if hasattr(sd.get(head), "shape") else 2
    try:
        student = build_student(cfg, num_classes)
    except ValueError as e:
        raise ModelError(f"{manifest_path}: cannot build its {arch!r} student: {e}") from None
    problems = _key_problems(student.state_dict(), sd)
    if problems:
        raise ModelError(f"{weights}: not a tskd student state dict for the student.arch="
                         f"{arch!r} student its {manifest_path.name} describes: {problems}; "
                         "expected "
                         + EXPECTED_MODELS)
    student.load_state_dict(sd)
    meta = student_meta(student, dict(cfg), _class_names_near(weights.parent, num_classes),
                        source=str(weights), **patch_meta(manifest_path))
    return student.eval(), meta


def patch_meta(manifest_path: Path) -> dict[str, int]:
    """``working_size`` and ``window`` of a student trained on patches (its stage manifest's
    resolved ``config.data``); ``{}`` for whole images (or a manifest without ``config``)."""
    from tskd.config import DataConfig

    data = (json.loads(manifest_path.read_text()).get("config") or {}).get("data") or {}
    known = {k: v for k, v in data.items() if k in ("image_size", "max_image_size",
                                                     "patch_size") and v is not None}
    if known.get("image_size", "auto") == "auto":
        return {}
    d = DataConfig(**known)
    return {"working_size": int(d.image_size), "window": d.patch} if d.patches else {}


def student_meta(student: torch.nn.Module, cfg: dict[str, Any], class_names: list[str], *,
                 source: str = "", working_size: int | None = None,
                 window: int | None = None) -> ModelMeta:
    """The :class:`ModelMeta` of a student built from ``cfg`` (any ``build_student`` model)."""
    return ModelMeta(img_size=student.img_size, num_classes=student.num_classes,
                     class_names=list(class_names),
                     pixel_mean=student.pixel_mean.flatten().tolist(),
                     pixel_std=student.pixel_std.flatten().tolist(),
                     logits_stride=int(student.logits_stride), student=cfg, source=source,
                     working_size=working_size, window=window)


def best_student_arm(run_dir: Path) -> str:
    """The student arm with the highest mean test Dice in ``results.json`` (else the only one)."""
    try:
        students = json.loads((run_dir / "results.json").read_text()).get("students") or {}
    except (OSError, json.JSONDecodeError):
        students = {}
    scored = {arm: s.get("dice") for arm, s in students.items() if isinstance(s, dict)
              and isinstance(s.get("dice"), (int, float)) and not math.isnan(s["dice"])
              and (run_dir / f"student_{arm}" / STUDENT_FILE).is_file()}
    if scored:
        return max(scored, key=scored.get)
    arms = sorted(p.parent.name[len("student_"):] for p in run_dir.glob(f"student_*/{STUDENT_FILE}"))
    if len(arms) == 1:
        return arms[0]
    raise ModelError(f"{run_dir}: no results.json to pick the best student from and "
                     f"{len(arms)} student stages ({arms}); name one with --student ARM")


def resolve_student_dir(path: Path, student: str | None = None) -> Path:
    """The ``student_<arm>`` stage directory a run dir / stage dir / ``student.pt`` stands for
    (``student="reference"``: the run's label-only ``reference`` stage)."""
    if path.is_file():
        return path.parent
    if (path / STUDENT_FILE).is_file():
        return path
    if student == REFERENCE_STAGE and (path / REFERENCE_STAGE / STUDENT_FILE).is_file():
        return path / REFERENCE_STAGE
    if any(path.glob(f"student_*/{STUDENT_FILE}")):
        arm = student or best_student_arm(path)
        stage = path / f"student_{arm}"
        if not (stage / STUDENT_FILE).is_file():
            have = sorted(p.parent.name for p in path.glob(f"student_*/{STUDENT_FILE}"))
            raise ModelError(f"{path}: no completed student stage student_{arm}; have {have}")
        log.info("model: %s", stage)
        return stage
    raise ModelError(f"{path}: holds no student ({STUDENT_FILE}); expected " + EXPECTED_MODELS)


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n or n.startswith("code/") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _onnx_meta(path: Path) -> ModelMeta:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any parse failure: not an ONNX file
        raise ModelError(f"{path}: not a readable ONNX model ({type(e).__name__}); expected "
                         + EXPECTED_MODELS) from None
    props = {p.key: p.value for p in model.metadata_props}
    if META_KEY not in props:
        raise ModelError(f"{path}: ONNX model without tskd metadata (metadata_props['{META_KEY}']);"
                         " expected a model exported by `tskd export`")
    return ModelMeta.from_dict(json.loads(props[META_KEY]), str(path))


def load_model(path: str | Path, *, student: str | None = None, device: str = "cpu",
               threads: int | None = None) -> Segmenter:
    """Load any model kind (see the module docstring) as a :class:`Segmenter`.

    Raises :class:`ModelError` for a missing path or a file of the wrong kind, naming what is
    expected.
    """
    from tskd.models.student import StudentInference

    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(f"{path}: no such file or directory; expected " + EXPECTED_MODELS)
    if device != "cpu" and not device.startswith("cuda"):
        raise ModelError(f"--device: invalid value {device!r}; allowed: cpu, cuda, cuda:N")
    if device.startswith("cuda") and not path.suffix == ".onnx" and not torch.cuda.is_available():
        raise ModelError(f"--device {device}: no CUDA GPU visible to torch here; use --device cpu")
    if path.is_file() and path.suffix == ".onnx":
        return OnnxSegmenter(path, _onnx_meta(path), device=device, threads=threads)
    if path.is_file() and _is_torchscript(path):
        extra = {f"{META_KEY}.json": ""}
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        if not extra[f"{META_KEY}.json"]:
            raise ModelError(f"{path}: TorchScript file without tskd metadata ({META_KEY}.json); "
                             "expected a model exported by `tskd export`")
        meta = ModelMeta.from_dict(json.loads(extra[f"{META_KEY}.json"]), str(path))
        return TorchSegmenter(module, meta, path, device=device, kind="torchscript")
    if path.is_file() and path.suffix not in (".pt", ".pth"):
        raise ModelError(f"{path}: unknown model file type {path.suffix!r}; expected "
                         + EXPECTED_MODELS)
    stage = resolve_student_dir(path, student)
    model, meta = load_student_artifact(path if path.is_file() else stage)
    return TorchSegmenter(StudentInference(model, channels_last=True), meta, stage / STUDENT_FILE,
                          device=device)


# ----------------------------------------------------------------------------------------------
# pre- and post-processing
# ----------------------------------------------------------------------------------------------


def to_model_input(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """``uint8 (H_i, W_i, 3)`` images -> ``float32 (B, 3, size, size)`` in 0..255 (antialiased
    bilinear resize, as ``Student.preprocess``)."""
    out = np.empty((len(images), 3, size, size), np.float32)
    for i, image in enumerate(images):
        x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None]
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=True)
        out[i] = x[0].numpy()
    return out


def windowed_logits(model: Segmenter, images: Sequence[np.ndarray]) -> np.ndarray:
    """Logits of a patch-trained model (``meta.window`` set) for whole images.

    The ``uint8 (H_i, W_i, 3)`` images are resized to ``meta.working_size`` (antialiased
    bilinear), then MONAI's ``sliding_window_inference`` runs ``meta.window``-px windows
    (overlap 0.25, Gaussian blending) through the model, each window resized to ``img_size``
    and its logits upsampled back to the window (as :func:`tskd.evaluation.sliding_window_logits`
    does for a torch model).

    Returns:
        float32 (B, C, S, S), ``S = meta.working_size``.
    """
    from monai.inferers import sliding_window_inference

    meta = model.meta
    size, window = int(meta.working_size or meta.img_size), int(meta.window or meta.img_size)

    def predictor(x: torch.Tensor) -> torch.Tensor:
        inp = x if x.shape[-1] == meta.img_size else F.interpolate(
            x, size=(meta.img_size, meta.img_size), mode="bilinear", align_corners=False,
            antialias=True)
        out = torch.from_numpy(model.logits(inp.numpy()))
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)

    x = torch.from_numpy(to_model_input(images, size))
    with torch.inference_mode():
        out = sliding_window_inference(x, roi_size=(window, window), sw_batch_size=4,
                                       predictor=predictor, overlap=0.25, mode="gaussian")
    return out.float().numpy()


def segment_logits(model: Segmenter, images: Sequence[np.ndarray]) -> np.ndarray:
    """Logits of ``uint8 (H_i, W_i, 3)`` images as ``tskd predict`` makes them: sliding windows
    over the working size for a patch-trained model (``meta.window < meta.working_size``,
    :func:`windowed_logits`), else one forward at ``meta.img_size``.

    Returns:
        float32 (B, C, h, w): ``(working_size,) * 2`` or ``img_size / logits_stride``; upsample
        each to its image's size with :func:`labels_from_logits`.
    """
    meta = model.meta
    if meta.window and meta.working_size and meta.window < meta.working_size:
        return windowed_logits(model, images)
    return model.logits(to_model_input(images, meta.img_size))


def labels_from_logits(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Low-res ``logits (C, h, w)`` -> ``uint8 (H, W)`` labels: bilinear upsampling, argmax."""
    x = torch.from_numpy(np.ascontiguousarray(logits))[None]
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x[0].argmax(0).to(torch.uint8).numpy()


def overlay_image(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``uint8 (H, W, 3)`` image with foreground classes tinted by :data:`PALETTE` (``alpha``)."""
    colours = PALETTE[labels.astype(np.int64) % len(PALETTE)].astype(np.float32)
    fg = (labels > 0)[..., None]
    blended = np.where(fg, (1 - alpha) * image.astype(np.float32) + alpha * colours, image)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# inputs, the batch loop, scoring
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictItem:
    """One input image: its id (the output file stem) and path."""

    id: str
    path: str


@dataclass(frozen=True)
class ItemResult:
    id: str
    path: str
    error: str | None = None


def find_inputs(path: str | Path) -> tuple[list[PredictItem], DatasetInfo | None]:
    """The images of one file, a folder (its image files, not recursive) or a tskd dataset.

    Returns the items (sorted by id) and, for a dataset, its :class:`DatasetInfo` (for scoring).
    """
    path = Path(path).expanduser()
    if path.is_file():
        return [PredictItem(path.stem, str(path))], None
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such image, folder or dataset")
    if (path / DATASET_JSON).is_file():
        info = load_dataset_info(path)
        return [PredictItem(c, str(info.images[c])) for c in info.case_ids], info
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    stems = [p.stem for p in files]
    return [PredictItem(p.stem if stems.count(p.stem) == 1 else p.name, str(p)) for p in files], None


def test_split_ids(info: DatasetInfo, model_source: str | Path) -> list[str]:
    """The test ids of ``info``: the split of the run the model came from (its
    ``data/splits.json``, when it names this dataset), else ``dataset.json``'s ``test`` split."""
    for parent in Path(model_source).resolve().parents[:3]:
        splits = parent / "data" / "splits.json"
        if splits.is_file():
            saved = json.loads(splits.read_text())
            if Path(saved.get("root", "")).resolve() == Path(info.root).resolve():
                return list(saved["test"])
    if info.splits and info.splits.get("test"):
        return list(info.splits["test"])
    raise ModelError(f"{info.root}: no test split: the model's run does not name this dataset "
                     "and dataset.json declares no splits.test")


def predict_batch(model: Segmenter, items: Sequence[PredictItem], out_dir: str | Path, *,
                  overlay: bool = False) -> list[ItemResult]:
    """Read, segment and write one batch; an unreadable image becomes an :class:`ItemResult`
    with its error (logged with its path) and the rest of the batch goes on."""
    out_dir = Path(out_dir)
    (out_dir / MASKS_DIR).mkdir(parents=True, exist_ok=True)
    results, good, images = [], [], []
    for item in items:
        try:
            images.append(read_image(item.path))
            good.append(item)
        except (OSError, ValueError) as e:
            log.error("skipping %s: %s", item.path, e)
            results.append(ItemResult(item.id, item.path, str(e)))
    if not good:
        return results
    logits = segment_logits(model, images)
    for item, image, lg in zip(good, images, logits):
        labels = labels_from_logits(lg, image.shape[:2])
        Image.fromarray(labels).save(out_dir / MASKS_DIR / f"{item.id}.png")
        if overlay:
            (out_dir / OVERLAYS_DIR).mkdir(exist_ok=True)
            Image.fromarray(overlay_image(image, labels)).save(
                out_dir / OVERLAYS_DIR / f"{item.id}.png")
        results.append(ItemResult(item.id, item.path))
    return results


def predict_items(model: Segmenter, items: Sequence[PredictItem], out_dir: str | Path, *,
                  batch_size: int = 8, overlay: bool = False,
                  progress_every: int = 50) -> list[ItemResult]:
    """Segment ``items`` in batches, logging progress every ``progress_every`` images."""
    results: list[ItemResult] = []
    start, next_report = time.perf_counter(), progress_every
    for i in range(0, len(items), batch_size):
        results += predict_batch(model, items[i:i + batch_size], out_dir, overlay=overlay)
        if len(results) >= next_report or len(results) == len(items):
            rate = len(results) / max(time.perf_counter() - start, 1e-9)
            log.info("predict: %d/%d images (%.1f images/s)", len(results), len(items), rate)
            next_report = len(results) + progress_every
    return results


def score_predictions(info: DatasetInfo, case_ids: Iterable[str], out_dir: str | Path,
                      ) -> dict[str, Any]:
    """Dice / HD95 / mIoU of the masks written under ``out_dir/masks`` against the dataset's
    (at each image's own size, with its field of view and pixel spacing)."""
    from tskd.metrics import SegmentationMetrics

    metrics = SegmentationMetrics(info.num_classes, class_names=info.class_names,
                                  spacing=info.spacing)
    for case_id in case_ids:
        pred = read_mask(Path(out_dir) / MASKS_DIR / f"{case_id}.png", info.num_classes)
        target = read_mask(info.masks[case_id], info.labels)
        fov = read_fov(info, case_id)
        metrics.update(torch.from_numpy(pred)[None], torch.from_numpy(target)[None],
                       None if fov is None else torch.from_numpy(fov)[None])
    return metrics.aggregate()
