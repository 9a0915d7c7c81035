"""Demo wall time per stage, and the student's CPU inference time against SAM ViT-B.

    python benchmarks/demo_speed.py                 # read the stage times of runs/demo
    python benchmarks/demo_speed.py --run           # run the demo first (fresh run dir)
    python benchmarks/demo_speed.py --skip-demo     # inference timings only

Inference (CPU, ``--threads`` threads, default 2): SAM ``vit_b`` built without weights (the same
network as the official checkpoint) against the tskd student (timm ViT-Tiny + FPN head) through
four paths: the PyTorch training forward (``Student(images).logits.argmax``), the lean PyTorch
path of ``tskd predict`` (``StudentInference``, channels-last head, pre-/post-processing
included), and the ONNX Runtime export in fp32 and int8 (dynamic quantisation), each at batch 1
and 8. SAM runs at its native 1024 px (the paper's operating size) and at 256/512 px for the
equal-input-size ratios. Every number is measured in this run; ratios are SAM / student
images per second; the issue's goals at batch 1 are printed beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def time_forward(model: torch.nn.Module, size: int, repeats: int, batch: int = 1, *,
                 device: torch.device | str = "cpu", warmup: int = 1,
                 dtype: torch.dtype | None = None) -> float:
    """Median seconds per forward of a (batch, 3, size, size) input, after ``warmup`` forwards.

    ``device``: where ``model`` lives (on CUDA each forward is timed to its synchronisation);
    ``dtype``: autocast to it (``None``: the model's own precision)."""
    device = torch.device(device)
    x = (torch.rand(batch, 3, size, size) * 255).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype is not None
                else contextlib.nullcontext())
    times = []
    with torch.inference_mode(), autocast:
        for _ in range(warmup):
            model(x)
        sync()
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            sync()
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


class TrainingForwardLabels(torch.nn.Module):
    """The student's training-time forward, then the argmax (the pre-issue inference path)."""

    def __init__(self, student: torch.nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images).logits.argmax(1)


def student_paths(size: int, tmp: Path, head_stride: int = 4,
                  decoder_dim: int = 128) -> dict[str, object]:
    """The student at ``size`` px through every inference path (random weights: speed only),
    with the FPN head making its logits at ``head_stride`` with ``decoder_dim`` channels."""
    from tskd.export import quantize_int8, write_onnx
    from tskd.models.student import Student, StudentInference
    from tskd.predict import OnnxSegmenter, TorchSegmenter, student_meta

    torch.manual_seed(0)
    kw = {"head_stride": head_stride, "decoder_dim": decoder_dim}
    student = Student(3, size, **kw).eval()
    meta = student_meta(student, {"model_name": "vit_tiny_patch16_224", "img_size": size,
                                  "patch_size": 16, **kw}, ["bg", "a", "b"])
    onnx_path = tmp / f"student{size}_{head_stride}_{decoder_dim}.onnx"
    write_onnx(StudentInference(student).eval(), torch.rand(2, 3, size, size) * 255, onnx_path,
               meta)
    int8_path = quantize_int8(onnx_path, onnx_path.with_suffix(".int8.onnx"), meta)
    threads = torch.get_num_threads()
    lean = Student(3, size, **kw).eval()
    lean.load_state_dict(student.state_dict())
    return {
        "PyTorch forward": TrainingForwardLabels(student),
        "PyTorch lean": TorchSegmenter(StudentInference(lean, channels_last=True), meta, tmp),
        "ONNX Runtime fp32": OnnxSegmenter(onnx_path, meta, threads=threads),
        "ONNX Runtime int8": OnnxSegmenter(int8_path, meta, threads=threads),
    }


def time_path(model: object, size: int, batch: int, repeats: int) -> float:
    """Median seconds per batch: ``nn.Module`` on a tensor, a ``Segmenter`` from uint8 images
    (pre-/post-processing included)."""
    from tskd.export import measure_latency

    if isinstance(model, torch.nn.Module):
        return time_forward(model, size, repeats, batch)
    return measure_latency(model, size=size, batch=batch, repeats=repeats)


def stage_times(run_dir: Path) -> list[tuple[str, float]]:
    rows = []
    for manifest in sorted(run_dir.glob("*/manifest.json"), key=lambda p: p.stat().st_mtime):
        data = json.loads(manifest.read_text())
        rows.append((data["stage"], data["wall_time_s"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="store_true", help="run the demo first")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--output-dir", default=str(REPO / "runs"))
    parser.add_argument("--repeats", type=int, default=10, help="student timings (median)")
    parser.add_argument("--sam-repeats", type=int, default=2, help="SAM timings (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--heads", nargs="+", default=["4:128", "8:64"], metavar="STRIDE:DIM",
                        help="student heads to time: student.head_stride:student.decoder_dim "
                             "(4:128 is the default student)")
    args = parser.parse_args()
    heads = [tuple(int(v) for v in h.split(":")) for h in args.heads]

    if not args.skip_demo:
        run_dir = Path(args.output_dir) / "demo"
        if args.run:
            start = time.time()
            subprocess.run([sys.executable, "-m", "tskd.cli", "run", "--force",
                            "--set", f"output_dir={args.output_dir}"], check=True)
            print(f"demo end to end: {time.time() - start:.0f} s")
        rows = stage_times(run_dir)
        if not rows:
            sys.exit(f"no stage manifests under {run_dir}: run with --run first")
        total = sum(t for _, t in rows)
        print(f"\ndemo wall time per stage ({run_dir})")
        for name, seconds in rows:
            print(f"  {name:<18} {seconds:8.1f} s  {seconds / total:6.1%}")
        print(f"  {'sum':<18} {total:8.1f} s")

    import tempfile

    from segment_anything import sam_model_registry

    from tskd.models.sam import SamSegmenter, build_sam

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"\nload average at start (1/5/15 min): {os.getloadavg()} on {os.cpu_count()} CPUs "
          "(above the CPU count, another process shared the CPU and the times are inflated)")
    print(f"\nCPU inference ({torch.get_num_threads()} threads; SAM median of {args.sam_repeats}, "
          f"student median of {args.repeats}); images per second")
    sam_1024 = SamSegmenter(sam_model_registry["vit_b"](checkpoint=None)).eval()
    t_sam = {1024: time_forward(sam_1024, 1024, args.sam_repeats)}
    del sam_1024
    for size in (256, 512):
        sam = SamSegmenter(build_sam("vit_b", num_classes=3, img_size=size)).eval()
        t_sam[size] = time_forward(sam, size, args.sam_repeats)
    print("  SAM vit_b, batch 1: " + ", ".join(f"{s} px {t:.2f} s ({1 / t:.3f} img/s)"
                                               for s, t in t_sam.items()))
    goals = {("PyTorch", 256): 500, ("PyTorch", 512): 100, ("export", 256): 800,
             ("export", 512): 150}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for head in heads:
            for size in (256, 512):
                for name, model in student_paths(size, Path(tmp), *head).items():
                    per_image = {b: time_path(model, size, b, args.repeats) / b for b in (1, 8)}
                    rows.append((head, size, name, per_image))
    print(f"\n  {'head s:dim':<10} {'student path':<20} {'px':>4} {'ms/img b1':>10} "
          f"{'ms/img b8':>10} {'img/s b1':>9} {'img/s b8':>9} {'vs SAM@1024 b1':>15} "
          f"{'vs SAM same px b1':>18}")
    best = {}
    for head, size, name, t in rows:
        ratio, same = t_sam[1024] / t[1], t_sam[size] / t[1]
        print(f"  {f'{head[0]}:{head[1]}':<10} {name:<20} {size:>4} {t[1] * 1e3:>10.1f} "
              f"{t[8] * 1e3:>10.1f} {1 / t[1]:>9.1f} {1 / t[8]:>9.1f} {ratio:>14.0f}x "
              f"{same:>17.1f}x")
        kind = "PyTorch" if name.startswith("PyTorch") else "export"
        best[(head, kind, size)] = max(best.get((head, kind, size), 0.0), ratio)
    print(f"\n  load average at the end: {os.getloadavg()}")
    print("\n  goals at batch 1 (best path of each kind vs SAM vit_b at 1024 px):")
    for head in heads:
        for (kind, size), goal in goals.items():
            got = best[(head, kind, size)]
            print(f"    head {head[0]}:{head[1]:<4} {kind:<8} {size} px: {got:6.0f}x  "
                  f"(goal >= {goal}x: {'met' if got >= goal else 'NOT met'})")


if __name__ == "__main__":
    main()
