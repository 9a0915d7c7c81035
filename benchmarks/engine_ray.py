"""Distillation through Ray Train on CPU: DDP against DeepSpeed ZeRO-2, and DeepSpeed with its
default 5e8-element ZeRO buckets against buckets sized to the model (tskd's default).

    PYTHONPATH=platform python benchmarks/engine_ray.py [--images 64] [--epochs 3] [--repeats 2]

One local Ray (2 CPUs, started and stopped here), one Train worker with 2 threads, the
distillation stage's own loop (``tskd.stages.distill._train_loop``): a ``sam_tiny`` teacher and
the default ViT-Tiny student at 128 px, batch 8, random transfer images. For each engine the
last epoch's images/s (``perf/images_per_s``) and loss, best of ``--repeats`` runs (the order
interleaves the engines). Ratios are against DDP, measured in this run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    import ray
    import ray.data

    from tskd.config import DistillConfig, RayConfig, StudentConfig, to_dict
    from tskd.models.sam import build_sam
    from tskd.stages.distill import _train_loop
    from tskd.stages.ray_train import fit_torch_trainer

    engines = {"DDP (torch)": {"kind": "torch", "zero_stage": 0},
               "DeepSpeed ZeRO-2, buckets sized to the model": {"kind": "deepspeed",
                                                                "zero_stage": 2},
               "DeepSpeed ZeRO-2, default 5e8 buckets": {
                   "kind": "deepspeed", "zero_stage": 2,
                   "raw": {"zero_optimization": {"reduce_bucket_size": int(5e8),
                                                 "allgather_bucket_size": int(5e8)}}}}
    print(f"load average at start: {os.getloadavg()} on {os.cpu_count()} CPUs")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        base = f"{tmp}/sam_tiny.pt"
        torch.manual_seed(0)
        torch.save(build_sam("sam_tiny", num_classes=3, img_size=128).state_dict(), base)
        g = torch.Generator().manual_seed(5)
        rows = [{"id": i, "image": (torch.rand(128, 128, 3, generator=g) * 255).numpy()}
                for i in range(args.images)]
        ray_cfg = RayConfig(num_workers=1, cpus_per_worker=1, torch_threads=2,
                            checkpoint_every=args.epochs)
        best: dict[str, tuple[float, float]] = {}
        for r in range(args.repeats):
            for name, engine in engines.items():
                d = to_dict(DistillConfig(epochs=args.epochs, batch_size=8))
                d["engine"].update(engine)
                config = {"teacher": {"tuned": False, "checkpoint": base, "arch": "sam_tiny",
                                      "img_size": 128, "num_classes": 3},
                          "student": to_dict(StudentConfig(img_size=128)), "distill": d,
                          "num_classes": 3, "n_transfer": args.images, "seed": 0,
                          "ray": to_dict(ray_cfg)}
                result = fit_torch_trainer(
                    _train_loop, train_config=config, ray_cfg=ray_cfg, name=f"e{r}_{time.time()}",
                    storage=f"{tmp}/ray", datasets={"transfer": ray.data.from_items(rows)})
                m = result.metrics
                rate = float(m["perf/images_per_s"])
                if rate > best.get(name, (0.0, 0.0))[0]:
                    best[name] = (rate, float(m["distill/loss"]))
    ray.shutdown()
    ddp = best["DDP (torch)"][0]
    for name, (rate, loss) in best.items():
        print(f"  {name:<46} {rate:6.2f} img/s  {ddp / rate:5.2f}x DDP's step time  "
              f"last-epoch loss {loss:.5f}")
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
