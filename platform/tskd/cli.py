"""The ``tskd`` command line: parse, validate, dispatch.

    tskd run [CONFIG] [--set key=value ...] [--address ADDR] [--force] [--only STAGE]
    tskd config [CONFIG] [--set key=value ...]      # print the resolved config as YAML
    tskd demo-data DIR [--kind ultrasound|vessels] [--n-images N] [--size PX] [--seed S]
    tskd inspect DATA [--set key=value ...]      # dataset fingerprint + resolution plan
    tskd convert FORMAT SRC DST [--size N] [--sequence SEQ] [--reviewer R]
                 [--resize stretch|letterbox] [--transducer XLSX]  # e.g. chaos, kidneyus
    tskd store ls|du|gc [--output-dir DIR] [--yes]  # the shared artifact store
    tskd tune [CONFIG] --space SPACE.yaml [--set key=value ...] [--resume] [--address ADDR]
    tskd predict MODEL INPUT OUTPUT [--overlay] [--device cuda] [--ray] ...
    tskd export MODEL OUT [--format onnx|torchscript] [--int8] | tskd export RUN_DIR --teacher OUT.pth
    tskd report RUN_DIR [--output report.html] [--images N]  # HTML report of a run or of runs

Every config error is reported before Ray starts, naming the field, the value and what is
allowed; so are an invalid dataset and a teacher checkpoint that does not fit ``teacher.arch``.
The exit status is 2 for bad input (one line on stderr; also when a Ray worker found it, the
line then names the stage's ``<stage>.error.log``), 1 for a failed run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from tskd.config import ConfigError, ExperimentConfig, TskdError, load_config, to_dict

log = logging.getLogger("tskd")

CONVERT_FORMATS = ("ph2", "drive", "chaos", "kidneyus", "autooral", "nnunet", "nnunet-export")
"""Formats of ``tskd convert`` (the registry is ``tskd.convert.CONVERTERS``)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tskd", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a TS-KD experiment (default: the built-in demo)")
    run.add_argument("config", nargs="?", help="experiment YAML (values only); none = demo")
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="override a config value, e.g. distill.epochs=4")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    run.add_argument("--force", action="store_true", help="re-run stages that are up to date")
    run.add_argument("--only", action="append", metavar="STAGE",
                     help="run only this stage and what it needs (repeatable)")

    show = sub.add_parser("config", help="print the resolved config as YAML")
    show.add_argument("config", nargs="?")
    show.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE")

    pln = sub.add_parser("plan", help="per-worker memory of distillation per teacher placement "
                         "(replicated, sharded, cached), for the configured teacher and SAM "
                         "sam_demo .. vit_h")
    pln.add_argument("config", nargs="?")
    pln.add_argument("--workers", type=int, metavar="N", help="default: ray.num_workers")
    pln.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3),
                     help="the student's ZeRO stage (2 and 3 split its gradients and optimiser "
                          "state across the workers)")
    pln.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    grd = sub.add_parser("grid", help="run an experiment grid (methods x transfer sizes x "
                         "label budgets x ranks x teachers x seeds) as Ray Tune trials")
    grd.add_argument("grid", metavar="GRID.yaml")
    grd.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value of every cell")
    grd.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")

    demo = sub.add_parser("demo-data", help="write the built-in demo dataset to DIR")
    demo.add_argument("dir")
    defaults = ExperimentConfig().data.demo
    demo.add_argument("--kind", choices=("ultrasound", "vessels"), default=defaults.kind,
                      help="ultrasound: organ + lesion (default); vessels: fundus-like images "
                      "with vessels 1-4 px wide")
    demo.add_argument("--n-images", type=int, default=defaults.n_images)
    demo.add_argument("--size", type=int, default=defaults.size)
    demo.add_argument("--seed", type=int, default=defaults.seed)

    insp = sub.add_parser("inspect", help="fingerprint a dataset (sizes, spacing, class "
                          "shares, objects, structure widths) and plan its working resolution")
    insp.add_argument("data", help="a dataset directory in the tskd format")
    insp.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE", help="config values whose sizes to check, e.g. "
                      "data.image_size=128 teacher.img_size=128")
    insp.add_argument("--max-cases", type=int, default=100,
                      help="measure at most this many masks (a seeded subset; default 100)")

    # names only (importing tskd.convert here would load torch for every command);
    # tskd.convert.convert checks them against its registry
    conv = sub.add_parser("convert", help="convert a public dataset distribution (or nnU-Net v2) "
                          "into the tskd format, or tskd into nnU-Net v2 (nnunet-export)")
    conv.add_argument("format", metavar="FORMAT", help="one of: " + ", ".join(CONVERT_FORMATS))
    conv.add_argument("src", help="the dataset as distributed (see tskd.convert.<format>)")
    conv.add_argument("dst", help="output directory (must not exist or be empty)")
    conv.add_argument("--sequence", metavar="SEQ",
                      help="chaos only: T2SPIR (default), T1DUAL_in or T1DUAL_out")
    conv.add_argument("--size", type=int, metavar="N",
                      help="resize to NxN (0 = native; default: the format's own)")
    conv.add_argument("--reviewer", type=int, metavar="R",
                      help="kidneyus only: whose annotations, 1 (default) or 2")
    conv.add_argument("--resize", metavar="MODE",
                      help="kidneyus only: how images are fitted into NxN: stretch (default, "
                           "as the paper) or letterbox (aspect kept, zero padding)")
    conv.add_argument("--transducer", metavar="XLSX",
                      help="kidneyus only: the transducer sheet with per-image spacing "
                           "(default: OpenKidneyUltrasoundDataSet_TransducerInfo.xlsx in SRC)")

    store = sub.add_parser("store", help="the shared artifact store: list entries (ls), sizes per "
                           "stage (du), remove entries no run uses (gc, dry run unless --yes)")
    store.add_argument("action", choices=("ls", "du", "gc"))
    store.add_argument("--output-dir", default=ExperimentConfig().output_dir,
                       help="the runs' output directory holding store/ (default: %(default)s)")
    store.add_argument("--yes", action="store_true", help="gc: really delete")

    tune = sub.add_parser("tune", help="search config values (Ray Tune + Optuna) over a space")
    tune.add_argument("config", nargs="?", help="experiment YAML (values only); none = demo")
    tune.add_argument("--space", required=True, help="search space YAML (search_spaces/*.yaml)")
    tune.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE", help="override a config value of every trial")
    tune.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    tune.add_argument("--resume", action="store_true",
                      help="resume the interrupted search of this experiment")

    report = sub.add_parser("report", help="write a self-contained HTML report of a run "
                            "(runs/<exp>) or of a directory of runs (seeds, grid cells)")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.add_argument("--output", "-o", metavar="FILE",
                        help="the HTML file (default: RUN_DIR/report.html)")
    report.add_argument("--images", type=int, default=3, metavar="N",
                        help="test images in the qualitative overlays (0: none; default 3)")
    report.add_argument("--transfer-samples", type=int, default=6, metavar="N",
                        help="transfer-set images shown per transfer set (default 6)")

    _add_deploy_parsers(sub)
    return parser


def _add_deploy_parsers(sub: Any) -> None:
    """``tskd predict`` and ``tskd export`` (see tskd.predict, tskd.export)."""
    models = ("MODEL: a run directory runs/<exp> (best student, or --student ARM), a "
              "student_<arm> directory or its student.pt, an exported .onnx or TorchScript .pt")
    pred = sub.add_parser("predict", help="segment an image, a folder or a dataset",
                          description=models)
    pred.add_argument("model")
    pred.add_argument("input", help="an image file, a folder of images or a tskd dataset "
                      "(with masks: Dice/HD95/mIoU are printed)")
    pred.add_argument("output", help="output folder: masks/<id>.png [, overlays/<id>.png]")
    pred.add_argument("--student", metavar="ARM", help="with a run directory: this arm "
                      "(e.g. ts_kd) instead of the best by test Dice")
    pred.add_argument("--split", choices=("all", "test"), default="all",
                      help="with a dataset: all cases, or the test split of the model's run "
                      "(else dataset.json's)")
    pred.add_argument("--overlay", action="store_true", help="also write colour overlays")
    pred.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    pred.add_argument("--batch-size", type=int, default=8)
    pred.add_argument("--progress-every", type=int, default=50, metavar="N",
                      help="log one progress line per N images")
    pred.add_argument("--threads", type=int, help="CPU threads (default: torch/onnxruntime's)")
    pred.add_argument("--ray", action="store_true", help="Ray Data batch inference (actor pool)")
    pred.add_argument("--actors", type=int, default=2, help="with --ray: actor pool size")
    pred.add_argument("--address", help="with --ray: cluster address (default: local Ray)")

    exp = sub.add_parser("export", help="export the student (ONNX/TorchScript + model card) "
                         "or the fine-tuned teacher (--teacher)", description=models)
    exp.add_argument("model")
    exp.add_argument("out", nargs="?", help="output file (.onnx or .pt)")
    exp.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    exp.add_argument("--student", metavar="ARM")
    exp.add_argument("--int8", action="store_true",
                     help="also write an int8 dynamically quantised ONNX model")
    exp.add_argument("--teacher", metavar="OUT.pth", help="instead: write the run's LoRA-merged "
                     "teacher as an official-format SAM checkpoint")


def check_paths(cfg: ExperimentConfig) -> None:
    """Input files named in the config exist (checked on the driver, before Ray starts)."""
    if cfg.data.root is not None and not (Path(cfg.data.root).expanduser() / "dataset.json").is_file():
        raise ConfigError(f"data.root: invalid value {cfg.data.root!r}; allowed: a directory "
                          "holding dataset.json, images/ and masks/ (see `tskd demo-data`)")
    if cfg.teacher.checkpoint is not None and not Path(cfg.teacher.checkpoint).expanduser().is_file():
        raise ConfigError(f"teacher.checkpoint: invalid value {cfg.teacher.checkpoint!r}; "
                          "allowed: an existing SAM checkpoint file")
    mae = cfg.imagenet_mae.checkpoint
    if "imagenet_mae" in cfg.students and not Path(str(mae)).expanduser().is_file():
        raise ConfigError(f"imagenet_mae.checkpoint: invalid value {mae!r}; allowed: an existing "
                          f"ViT MAE checkpoint file (no file at {Path(str(mae)).expanduser()})")


def check_inputs(cfg: ExperimentConfig) -> None:
    """Everything the config names is usable, checked on the driver before Ray starts: the
    files exist (:func:`check_paths`), the dataset passes ``validate_dataset`` with the
    configured budget, and the teacher checkpoint fits ``teacher.arch``.

    Raises:
        ConfigError: a missing file or a checkpoint of another architecture.
        DatasetError: the dataset is invalid (the data stage would fail the same way).
    """
    check_paths(cfg)
    check_student_block(cfg)
    num_classes = 2
    if cfg.data.root is not None:
        from tskd.data.format import validate_dataset

        info = validate_dataset(Path(cfg.data.root).expanduser(), n_labels=cfg.data.n_labels,
                                n_val=cfg.data.n_val, test_fraction=cfg.data.test_fraction,
                                seed=cfg.seed)
        num_classes = info.num_classes
    if cfg.teacher.checkpoint is not None:
        check_teacher_checkpoint(Path(cfg.teacher.checkpoint).expanduser(), cfg.teacher.arch,
                                 img_size=cfg.teacher.img_size, num_classes=num_classes)
    if "imagenet_mae" in cfg.students:
        check_vit_checkpoint(cfg)


def check_vit_checkpoint(cfg: ExperimentConfig) -> None:
    """``imagenet_mae.checkpoint`` loads into the configured ViT student (with the configured
    interpolation or skipping): one line naming the field and the file otherwise.

    Raises:
        ConfigError: unreadable file, or keys/shapes that do not fit the student's ViT.
    """
    from tskd.models.students import build_student
    from tskd.models.vit_checkpoint import read_vit_state_dict, vit_state_dict_into

    path = Path(str(cfg.imagenet_mae.checkpoint)).expanduser()
    field = "imagenet_mae.checkpoint"
    try:
        state = read_vit_state_dict(path)
    except ValueError as exc:
        raise ConfigError(f"{field}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(f"{field}: cannot read {path} as a ViT checkpoint "
                          f"({type(exc).__name__}: {first})") from None
    backbone = build_student(to_dict(cfg.student), 2).backbone  # ViT-Tiny: ~0.1 s to build
    try:
        vit_state_dict_into(backbone, state, mismatch=cfg.imagenet_mae.mismatch,
                            source=str(path))
    except ValueError as exc:
        raise ConfigError(f"{field}: {exc}") from None


def check_student_block(cfg: ExperimentConfig) -> None:
    """``distill.student_block`` names a block of the configured ViT student (built on the
    ``meta`` device: no memory, no weights).

    Raises:
        ConfigError: naming the field, the value and the allowed range.
    """
    if cfg.student.arch != "vit" or cfg.distill.student_block == -1:
        return
    import torch

    from tskd.models.students import build_student

    try:
        with torch.device("meta"):
            build_student(to_dict(cfg.student), 2, hidden_block=cfg.distill.student_block)
    except ValueError as exc:
        raise ConfigError(f"distill.student_block: invalid value {cfg.distill.student_block!r}; "
                          f"{exc}") from None


def check_teacher_checkpoint(path: Path, arch: str, *, img_size: int, num_classes: int) -> None:
    """The checkpoint's keys and shapes fit ``arch`` (with the resizing and class adaptation
    the teacher stage will do), read without loading the weights: the file is memory-mapped
    (``torch.load(mmap=True)``) and matched against a model built on the ``meta`` device.

    Raises:
        ConfigError: one line naming the file, the configured arch and the arch the checkpoint
            looks like; or that the file is not a readable SAM state dict.
    """
    import warnings

    import torch

    from tskd.models.sam import _unwrap_state_dict, build_sam, load_sam_state_dict

    field = "teacher.checkpoint"
    try:
        try:
            state = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # a legacy (non-zip) file cannot be memory-mapped: read it once
            state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(f"{field}: cannot read {path} as a SAM checkpoint "
                          f"({type(exc).__name__}: {first})") from None
    try:
        sd = _unwrap_state_dict(state, path)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # copying into meta tensors is a no-op
            sam = build_sam(arch, num_classes=num_classes, img_size=img_size)
            load_sam_state_dict(sam, sd, arch=arch, source=str(path))
    except ValueError as exc:
        raise ConfigError(f"{field}: {str(exc).splitlines()[0].rstrip(':')}") from None


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table of the teacher's, students' and label-only reference's test scores,
    with a footer naming the metric conventions, the label counts, the seed and the config
    fingerprint."""
    rows = [("teacher (LoRA SAM)", results["teacher"])]
    rows += [(f"student {arm}", scores) for arm, scores in results["students"].items()]
    if "reference" in results:  # absent when reference.arch is none
        rows.append((f"reference {results['reference']['arch']} (labels only)",
                     results["reference"]))
    per_class = results["teacher"]["per_class"]
    classes = [c for c, v in per_class.items() if "dice" in v]  # a background has mIoU only
    unit = results.get("hd95_unit", "")
    head = ["model", "Dice", f"HD95 ({unit})", "mIoU"] + [f"Dice {c}" for c in classes]
    lines = [head]
    for name, s in rows:
        lines.append([name, f"{s['dice']:.4f}", f"{s['hd95']:.2f}", f"{s['miou']:.4f}"]
                     + [f"{s['per_class'][c]['dice']:.4f}" for c in classes])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    footer = _table_footer(results)
    if footer:
        out += ["", footer]
    for name in results.get("continued_past_failed_checks", []):
        v = results["checks"][name]
        out.append(f"WARNING: this run continued past a failed check ({name}): {v['model']} "
                   f"Dice {v['dice']:.4f} <= floor {v['floor']:.4f} (check.on_fail=continue)")
    return "\n".join(out)


def _table_footer(results: dict[str, Any]) -> str:
    parts = []
    conv = results.get("metrics")
    if conv:
        parts.append(f"{conv['convention']} empty-mask convention, mIoU "
                     f"{'with' if conv['miou_includes_background'] else 'without'} background, "
                     f"HD95 in {conv['hd95_unit']}")
    seen = results.get("labelled_images", {}).get("teacher")
    if seen:
        parts.append(f"labels per model: {seen['train']} train + {seen['val']} val")
    if "seed" in results:
        parts.append(f"seed {results['seed']}")
    if results.get("config_fingerprint"):
        parts.append(f"config {results['config_fingerprint']}")
    return "; ".join(parts)


def _init_ray(cfg: ExperimentConfig) -> None:
    """Start a local Ray or connect to ``ray.address``; Ray's routine logging stays off the
    console (:mod:`tskd.stages.console`) and its log directory is printed.

    Inside a ``ray job submit`` job the job's runtime env applies (``cluster/runtime_env.yaml``
    sets the same ``worker_process_setup_hook``); a runtime env given here would replace it.
    """
    import ray

    from tskd.stages.console import quiet_ray_process, ray_init_kwargs, session_log_dir

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # set by `ray job submit`
        ray.init(address=address, **({} if in_job else ray_init_kwargs()))
    else:
        log.info("starting a local Ray")
        # Train V2 starts a node-drain watcher actor per Train run; a local Ray has no node to
        # drain, so it would only cost a process start per stage. Clusters keep it.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(include_dashboard=False, **ray_init_kwargs())
    import ray.data  # noqa: F401 - configures Ray Data's loggers, which quiet_ray_process adjusts

    quiet_ray_process()
    logs = session_log_dir()
    if logs:
        log.info("Ray's own logs: %s", logs)


def cmd_run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    cfg = load_config(args.config, overrides)
    check_inputs(cfg)
    import json

    import ray

    from tskd.pipeline import run_pipeline

    _init_ray(cfg)
    try:
        run_pipeline(cfg, force=args.force, only=args.only)
    finally:
        ray.shutdown()
    results_path = cfg.run_dir / "results.json"
    if results_path.is_file() and not args.only:
        print(format_table(json.loads(results_path.read_text())))
        print(f"\nresults: {results_path}")
        print(f"report:  tskd report {cfg.run_dir}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tskd.report import write_report

    if args.images < 0 or args.transfer_samples < 0:
        raise ConfigError(f"--images / --transfer-samples: invalid value "
                          f"{min(args.images, args.transfer_samples)}; allowed: a number >= 0")
    out = write_report(args.run_dir, args.output, n_images=args.images,
                       n_transfer=args.transfer_samples)
    print(f"report: {out}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from tskd.memory_plan import dataset_classes, format_plan, plan

    cfg = load_config(args.config, args.overrides)
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers: invalid value {args.workers}; allowed: an integer >= 1")
    num_classes = dataset_classes(cfg)
    workers = args.workers or cfg.ray.num_workers
    print(format_plan(plan(cfg, workers, zero_stage=args.zero_stage, num_classes=num_classes),
                      workers))
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from tskd.grid import cells, format_grid, load_grid, run_grid

    overrides = list(args.overrides) + ([f"ray.address={args.address}"] if args.address else [])
    grid = load_grid(args.grid, overrides)
    checked: set[tuple] = set()
    for cell in cells(grid):  # every distinct dataset budget and checkpoint, before Ray starts
        c = cell.config
        key = (c.data.root, c.data.n_labels, c.seed, c.teacher.checkpoint, c.teacher.arch)
        if key not in checked:
            checked.add(key)
            check_inputs(c)
    import ray

    _init_ray(cells(grid)[0].config)
    try:
        rows = run_grid(grid)
    finally:
        ray.shutdown()
    print(format_grid(rows))
    print(f"table: {grid.dir / 'grid.csv'} (also grid.parquet)")
    print(f"report: tskd report {grid.dir}")
    failed = [r["cell"] for r in rows if r["status"] != "done"]
    if failed:
        print(f"{len(failed)} cell(s) not finished: {', '.join(failed)}; errors in "
              f"{grid.dir / 'errors'}; run the same command again to retry them")
    return 1 if failed else 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    if args.kind == "vessels":
        from tskd.data.demo_vessels import write_vessels_dataset as write
    else:
        from tskd.data.demo import write_demo_dataset as write

    root = write(Path(args.dir), n_images=args.n_images, size=args.size, seed=args.seed)
    print(f"wrote the {args.kind} demo dataset ({args.n_images} images, {args.size} px) to {root}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from tskd.data.fingerprint import (compute_fingerprint, format_fingerprint, model_sizes,
                                       plan_resolution, resolved_patch, size_warnings,
                                       teacher_logit_warnings)
    from tskd.data.format import load_dataset_info

    cfg = load_config(None, [*args.overrides, f"data.root={args.data}"])
    check_paths(cfg)
    info = load_dataset_info(Path(args.data).expanduser())
    fp = compute_fingerprint(info, max_cases=args.max_cases, seed=cfg.seed)
    plan = plan_resolution(fp, max_size=cfg.data.max_image_size)
    size = plan.image_size if cfg.data.image_size == "auto" else int(cfg.data.image_size)
    patch = resolved_patch(cfg, size)
    sizes = model_sizes(cfg, size, patch)
    # the plan's own warnings already cover its size
    extra = (size_warnings(fp, {k: v for k, v in sizes.items() if v != plan.image_size})
             + teacher_logit_warnings(fp, cfg.teacher.img_size, patch_scale=size / patch))
    print(format_fingerprint(fp, plan, extra))
    print("sizes checked: " + ", ".join(f"{k}={v}" for k, v in sizes.items())
          + f"; teacher logits at teacher.img_size={cfg.teacher.img_size}"
          + (f"; data.patch_size {patch} (patches of the {size}-px images)" if patch < size
             else "; whole images (no patches)"))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from tskd.convert import convert

    summary = convert(args.format, args.src, args.dst, sequence=args.sequence, size=args.size,
                      reviewer=args.reviewer, resize=args.resize, transducer=args.transducer)
    print(summary.format_text())
    return 0


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _when(t: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def cmd_store(args: argparse.Namespace) -> int:
    from tskd.store import Store, garbage, referenced
    from tskd.store import tree_size as store_tree_size

    from tskd.storage import is_remote

    if is_remote(args.output_dir):
        print(f"error: --output-dir {args.output_dir}: tskd store works on local output "
              "directories only (an object store's entries are listed by its own tools)",
              file=sys.stderr)
        return 2
    output_dir = Path(args.output_dir).expanduser().resolve()
    store = Store.for_output_dir(output_dir)
    entries = store.entries()
    if args.action == "ls":
        refs = referenced(output_dir)
        rows = [("stage", "fingerprint", "size", "last used", "runs")]
        rows += [(e.stage, e.fingerprint, f"{_size(e.size())} ({e.size()} B)",
                  _when(e.last_used()), ",".join(refs.get((e.stage, e.fingerprint), [])) or "-")
                 for e in entries]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        print(f"{len(entries)} entries in {store.root}")
    elif args.action == "du":
        per_stage: dict[str, list[int]] = {}
        for e in entries:
            per_stage.setdefault(e.stage, []).append(e.size())
        print(f"{'stage':<24} {'entries':>7} {'bytes':>14}  size")
        for stage, sizes in sorted(per_stage.items()):
            print(f"{stage:<24} {len(sizes):>7} {sum(sizes):>14}  {_size(sum(sizes))}")
        total = sum(sum(s) for s in per_stage.values())
        print(f"{'total':<24} {len(entries):>7} {total:>14}  {_size(total)}")
    else:
        doomed = garbage(store, output_dir)
        temporaries = store.temporaries()
        freed = 0
        for e in doomed:
            size = e.size()
            if not args.yes:
                print(f"would remove {e.stage}/{e.fingerprint} ({_size(size)}, last used "
                      f"{_when(e.last_used())})")
            elif store.remove(e):
                print(f"removed {e.stage}/{e.fingerprint} ({_size(size)})")
            else:
                print(f"skipped {e.stage}/{e.fingerprint}: being built")
                continue
            freed += size
        for tmp in temporaries:
            size = store_tree_size(tmp)
            if not args.yes:
                print(f"would remove the unfinished build {tmp.parent.name}/{tmp.name} "
                      f"({_size(size)}) unless a builder still runs")
            elif store.remove_temporary(tmp):
                print(f"removed the unfinished build {tmp.parent.name}/{tmp.name}")
            else:
                continue
            freed += size
        n = len(doomed) + len(temporaries)
        if args.yes:
            print(f"freed {_size(freed)}")
        else:
            print(f"dry run: {n} unreferenced entries/builds, {_size(freed)}; "
                  "pass --yes to delete them")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    cfg = load_config(args.config, overrides)
    check_paths(cfg)
    from tskd.pipeline import plan
    from tskd.search_space import load_space

    space = load_space(args.space, cfg, stages=[s.name for s in plan(cfg)])
    from tskd.tune import check_fresh, format_trials, run_tune

    check_fresh(cfg, args.resume)
    import ray

    _init_ray(cfg)
    try:
        outcome = run_tune(cfg, space, resume=args.resume)
    finally:
        ray.shutdown()
    print(format_trials(outcome.table, list(space.params), space.objective.mode))
    print(f"\nbest {space.objective.metric} = {outcome.best_value:.4f} with {outcome.best_params}")
    print(f"best config: {outcome.best_config}   (tskd run {outcome.best_config})")
    print(f"trials: {outcome.dir / 'trials.csv'}")
    best_results = load_config(outcome.best_config).run_dir / "results.json"
    if best_results.is_file():
        import json

        print("\nthe best config on the test split:")
        print(format_table(json.loads(best_results.read_text())))


def cmd_predict(args: argparse.Namespace) -> int:
    from tskd.predict import (find_inputs, load_model, predict_items, score_predictions,
                              test_split_ids)

    if args.batch_size < 1 or args.progress_every < 1 or args.actors < 1:
        raise ConfigError("--batch-size, --progress-every and --actors: allowed: integers >= 1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = load_model(args.model, student=args.student, device=args.device, threads=args.threads)
    items, info = find_inputs(args.input)
    if args.split == "test":
        if info is None:
            raise ConfigError(f"--split test: allowed only with a dataset INPUT; {args.input} "
                              "has no dataset.json")
        test = set(test_split_ids(info, model.source))
        items = [it for it in items if it.id in test]
    log.info("predict: %d images from %s with %s", len(items), args.input, model)
    if args.ray:
        import ray

        from tskd.stages.deploy import predict_with_ray

        from tskd.stages.console import ray_init_kwargs

        ray.init(address=args.address or os.environ.get("RAY_ADDRESS"), include_dashboard=False,
                 **ray_init_kwargs())
        try:
            results = predict_with_ray(model.source,
                                       items, args.output, student=args.student,
                                       batch_size=args.batch_size, num_actors=args.actors,
                                       overlay=args.overlay, device=args.device,
                                       threads=args.threads)
        finally:
            ray.shutdown()
    else:
        results = predict_items(model, items, args.output, batch_size=args.batch_size,
                                overlay=args.overlay, progress_every=args.progress_every)
    failed = [r for r in results if r.error]
    done = [r.id for r in results if not r.error]
    print(f"wrote {len(done)} masks to {Path(args.output) / 'masks'}")
    if info is not None and info.masks and done:
        scores = score_predictions(info, [c for c in done if c in info.masks], args.output)
        unit = "mm" if info.spacing else "pixels"
        print(f"Dice {scores['dice']:.4f}  HD95 {scores['hd95']:.2f} {unit}  "
              f"mIoU {scores['miou']:.4f}  ({len(done)} images)")
        for name, s in scores["per_class"].items():
            print(f"  {name:<16} Dice {s['dice']:.4f}  HD95 {s['hd95']:.2f}  IoU {s['miou']:.4f}")
    for r in failed:
        print(f"tskd: failed: {r.path}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.teacher:
        from tskd.stages.deploy import export_teacher

        info = export_teacher(args.model, args.teacher)
        print(f"wrote the LoRA-merged teacher ({info['arch']}, {info['img_size']} px, "
              f"{info['num_classes']} classes) to {args.teacher}; load: {info['load']}")
        return 0
    if not args.out:
        raise ConfigError("export: OUT missing; allowed: an output file (.onnx for --format onnx,"
                          " .pt for torchscript), or --teacher OUT.pth")
    from tskd.export import export_student

    rep = export_student(args.model, args.format, args.out, student=args.student, int8=args.int8)
    print(f"wrote {rep.path} ({rep.size_mb:.1f} MB): largest logit difference to PyTorch "
          f"{rep.max_logit_diff:.2e}, label agreement {rep.mask_agreement:.6f}, CPU latency "
          f"{rep.latency_ms:.1f} ms/image")
    if rep.int8_path is not None:
        change = (f", test Dice {rep.dice['fp32']:.4f} -> {rep.dice['int8']:.4f} "
                  f"({rep.dice['int8'] - rep.dice['fp32']:+.4f})" if rep.dice else "")
        print(f"wrote {rep.int8_path}: largest logit difference {rep.int8_max_logit_diff:.2e}, "
              f"{rep.int8_latency_ms:.1f} ms/image{change}")
    print("files: " + ", ".join(str(f) for f in rep.files))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("TSKD_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = _parser().parse_args(argv)
    commands = {"run": cmd_run, "config": cmd_config, "plan": cmd_plan, "grid": cmd_grid,
                "demo-data": cmd_demo_data, "inspect": cmd_inspect,
                "convert": cmd_convert, "store": cmd_store, "tune": cmd_tune,
                "predict": cmd_predict, "export": cmd_export, "report": cmd_report}
    try:
        return commands[args.command](args)
    except TskdError as exc:
        print(f"tskd: {_error_kind(exc)}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - data errors get one clean line, not a traceback
        from tskd.data.format import DatasetError

        if isinstance(exc, DatasetError):
            print(f"tskd: {_error_kind(exc)}: {exc}", file=sys.stderr)
            return 2
        if args.command == "report" and isinstance(exc, FileNotFoundError):
            print(f"tskd: report: {exc}", file=sys.stderr)
            return 2
        if args.command in ("predict", "export"):
            from tskd.predict import ModelError

            if isinstance(exc, (ModelError, FileNotFoundError)):
                print(f"tskd: {args.command}: {exc}", file=sys.stderr)
                return 2
        raise


def _error_kind(exc: BaseException) -> str:
    """``config error`` / ``dataset error`` / ``error`` for the message (a
    :class:`~tskd.stages.errors.StageFailed` is named after the worker's error, its ``cause``)."""
    from tskd.data.format import DatasetError

    from tskd.config import QualityCheckFailed

    exc = getattr(exc, "cause", exc)
    if isinstance(exc, QualityCheckFailed):
        return "quality check"
    if isinstance(exc, ConfigError):
        return "config error"
    if isinstance(exc, DatasetError):
        return "dataset error"
    return "error"

if __name__ == "__main__":
    sys.exit(main())
