"""Demo wall time per stage, and the student's CPU inference time against SAM ViT-B.

    python benchmarks/demo_speed.py                 # read the stage times of runs/demo
    python benchmarks/demo_speed.py --run           # run the demo first (fresh run dir)
    python benchmarks/demo_speed.py --skip-demo     # inference timings only

Inference: SAM ``vit_b`` built without weights (the same network as the official checkpoint)
against the tskd student (timm ViT-Tiny + FPN head), one image at a time on CPU, at their
operating sizes (SAM at its native 1024 px, as the paper's teacher runs; the student at 256 and
512 px) and at equal input sizes. Every number is measured in this run; ratios are SAM / student.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def time_forward(model: torch.nn.Module, size: int, repeats: int) -> float:
    """Median seconds per forward of one (1, 3, size, size) image, after one warm-up."""
    x = torch.rand(1, 3, size, size) * 255
    times = []
    with torch.inference_mode():
        model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


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
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

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

    from segment_anything import sam_model_registry

    from tskd.models.sam import SamSegmenter, build_sam
    from tskd.models.student import Student

    torch.manual_seed(0)
    print(f"\nCPU inference per image ({torch.get_num_threads()} threads, median of "
          f"{args.repeats})")
    sam_1024 = SamSegmenter(sam_model_registry["vit_b"](checkpoint=None)).eval()
    t_sam = {1024: time_forward(sam_1024, 1024, args.repeats)}
    del sam_1024
    for size in (256, 512):
        sam = SamSegmenter(build_sam("vit_b", num_classes=3, img_size=size)).eval()
        t_sam[size] = time_forward(sam, size, args.repeats)
    t_student = {}
    for size in (256, 512, 1024):
        student = Student(3, size).eval()
        t_student[size] = time_forward(student, size, args.repeats)
    print(f"  SAM vit_b: " + ", ".join(f"{s} px {t * 1e3:.0f} ms" for s, t in t_sam.items()))
    print(f"  student:   " + ", ".join(f"{s} px {t * 1e3:.0f} ms" for s, t in t_student.items()))
    print("\n  operating sizes (SAM at 1024 px):")
    for size in (256, 512):
        print(f"    student {size} px: {t_sam[1024] / t_student[size]:6.1f}x faster")
    print("  equal input size:")
    for size in (256, 512, 1024):
        print(f"    {size} px: {t_sam[size] / t_student[size]:6.1f}x faster")


if __name__ == "__main__":
    main()
