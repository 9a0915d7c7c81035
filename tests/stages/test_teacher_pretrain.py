"""Teacher pre-training on the engine seam: the Ray Train loop trains the same SAM as a
hand-written AdamW loop over the same corpus (the code before the engine seam), and a worker
that dies midway resumes from its last checkpoint, at the next step, to the same SAM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tskd.config import PretrainConfig, RayConfig, to_dict

STEPS, BATCH, SIZE, SEED = 10, 2, 32, 3
TOL = dict(rtol=1e-5, atol=1e-6)
"""Separate processes, the same ops in the same order: equal up to float rounding."""


def _reference() -> dict[str, torch.Tensor]:
    """The loop as written before the engine seam: AdamW, warm-up + cosine per step, one
    worker, the corpus in order."""
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from torch.utils.data import DataLoader

    from tskd.data.corpus import CORPUS_LABELS, ProceduralCorpus
    from tskd.losses import SegLoss
    from tskd.models.sam import SamSegmenter, build_sam

    p = _pretrain()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker (ray.torch_threads): the same reduction order
    torch.manual_seed(SEED)  # what worker_setup does on rank 0
    model = SamSegmenter(build_sam("sam_tiny", num_classes=len(CORPUS_LABELS),
                                   img_size=SIZE)).train()
    loader = DataLoader(ProceduralCorpus(size=SIZE, length=STEPS * BATCH, seed=SEED),
                        batch_size=BATCH, shuffle=False, drop_last=True)
    optim = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
    sched = get_cosine_schedule_with_warmup(optim, p["warmup_steps"], STEPS)
    criterion = SegLoss()
    for batch in loader:
        loss = criterion(model(batch["image"]).logits, batch["mask"])
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        sched.step()
    torch.set_num_threads(threads)
    return model.sam.state_dict()


def _pretrain() -> dict:
    return to_dict(PretrainConfig(steps=STEPS, batch_size=BATCH, lr=1e-3, warmup_steps=2))


def _run(tmp_path: Path, name: str, **extra) -> dict[str, torch.Tensor]:
    from tskd.stages.ray_train import fit_torch_trainer, load_result_state
    from tskd.stages.teacher_pretrain import _train_loop

    ray_cfg = RayConfig(num_workers=1, cpus_per_worker=1, torch_threads=1, checkpoint_every=2,
                        max_failures=1)
    config = {"arch": "sam_tiny", "img_size": SIZE, "pretrain": _pretrain(), "seed": SEED,
              "ray": to_dict(ray_cfg)} | extra
    result = fit_torch_trainer(_train_loop, train_config=config, ray_cfg=ray_cfg, name=name,
                               storage=tmp_path / name)
    assert result.metrics["step"] == STEPS
    return load_result_state(result)["model"]


@pytest.mark.slow
def test_teacher_pretraining_trains_the_hand_written_loops_sam_and_resumes(tmp_path, ray_local):
    reference = _reference()
    plain = _run(tmp_path, "plain")
    assert set(plain) == set(reference)  # the official SAM layout (no "sam." prefix)
    for key, value in reference.items():
        torch.testing.assert_close(plain[key], value, **TOL, msg=lambda m, k=key: f"{k}: {m}")
    # the worker dies at the start of the 4th tenth; the last checkpoint is the 2nd tenth's
    marker = tmp_path / "failed.marker"
    resumed = _run(tmp_path, "lost_worker",
                   fail_once={"rank": 0, "epoch": 4, "marker": str(marker)})
    assert marker.exists()
    for key, value in reference.items():
        torch.testing.assert_close(resumed[key], value, **TOL, msg=lambda m, k=key: f"{k}: {m}")
