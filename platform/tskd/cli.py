"""The ``tskd`` command line: parse, validate, dispatch.

    tskd run [CONFIG] [--set key=value ...] [--address ADDR] [--force] [--only STAGE]
    tskd config [CONFIG] [--set key=value ...]      # print the resolved config as YAML
    tskd demo-data DIR [--n-images N] [--size PX] [--seed S]
    tskd convert FORMAT SRC DST [--sequence SEQ] [--size N]   # e.g. drive, chaos, nnunet-export
    tskd predict MODEL INPUT OUTPUT [--overlay] [--device cuda] [--ray] ...
    tskd export MODEL OUT [--format onnx|torchscript] [--int8] | tskd export RUN_DIR --teacher OUT.pth

Every config error is reported before Ray starts, naming the field, the value and what is
allowed; the exit status is 2 for bad input, 1 for a failed run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from tskd.config import ConfigError, ExperimentConfig, load_config, to_dict

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

    demo = sub.add_parser("demo-data", help="write the built-in demo dataset to DIR")
    demo.add_argument("dir")
    defaults = ExperimentConfig().data.demo
    demo.add_argument("--n-images", type=int, default=defaults.n_images)
    demo.add_argument("--size", type=int, default=defaults.size)
    demo.add_argument("--seed", type=int, default=defaults.seed)

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


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table of the teacher's and students' test scores."""
    rows = [("teacher (LoRA SAM)", results["teacher"])]
    rows += [(f"student {arm}", scores) for arm, scores in results["students"].items()]
    classes = list(results["teacher"]["per_class"])
    unit = results.get("hd95_unit", "")
    head = ["model", "Dice", f"HD95 ({unit})", "mIoU"] + [f"Dice {c}" for c in classes]
    lines = [head]
    for name, s in rows:
        lines.append([name, f"{s['dice']:.4f}", f"{s['hd95']:.2f}", f"{s['miou']:.4f}"]
                     + [f"{s['per_class'][c]['dice']:.4f}" for c in classes])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _init_ray(cfg: ExperimentConfig) -> None:
    import ray

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address)
    else:
        log.info("starting a local Ray")
        ray.init(include_dashboard=False)


def cmd_run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    cfg = load_config(args.config, overrides)
    check_paths(cfg)
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
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from tskd.data.demo import write_demo_dataset

    root = write_demo_dataset(Path(args.dir), n_images=args.n_images, size=args.size,
                              seed=args.seed)
    print(f"wrote the demo dataset ({args.n_images} images, {args.size} px) to {root}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from tskd.convert import convert

    summary = convert(args.format, args.src, args.dst, sequence=args.sequence, size=args.size)
    print(summary.format_text())
    return 0


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

        ray.init(address=args.address or os.environ.get("RAY_ADDRESS"), include_dashboard=False)
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
    commands = {"run": cmd_run, "config": cmd_config, "demo-data": cmd_demo_data,
                "convert": cmd_convert, "predict": cmd_predict, "export": cmd_export}
    try:
        return commands[args.command](args)
    except ConfigError as exc:
        print(f"tskd: config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - data errors get one clean line, not a traceback
        from tskd.data.format import DatasetError

        if isinstance(exc, DatasetError):
            print(f"tskd: dataset error: {exc}", file=sys.stderr)
            return 2
        if args.command in ("predict", "export"):
            from tskd.predict import ModelError

            if isinstance(exc, (ModelError, FileNotFoundError)):
                print(f"tskd: {args.command}: {exc}", file=sys.stderr)
                return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
