"""fit_torch_trainer with ray.deterministic: the same rows reach the same workers in the same
order whatever order Ray Data's blocks hold them in."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tskd.config import RayConfig


def _recorder(out_dir: str):
    """A train function (defined here so cloudpickle ships it by value) that writes the ids
    each worker receives, in order, to ``out_dir/rank<r>.json``."""

    def train_fn(config):
        import ray.train
        import torch

        from tskd.stages.ray_train import worker_setup

        worker_setup(config["ray"], 0)
        rank = ray.train.get_context().get_world_rank()
        ids = []
        for batch in ray.train.get_dataset_shard("transfer").iter_torch_batches(
                batch_size=4, dtypes={"id": torch.int64, "x": torch.float32},
                local_shuffle_buffer_size=8, local_shuffle_seed=7):
            ids += batch["id"].tolist()
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(ids, f)

    return train_fn


@pytest.mark.slow
def test_deterministic_ingest_ignores_block_order(tmp_path, ray_local):
    import ray.data

    from tskd.stages.ray_train import fit_torch_trainer

    n = 40
    seen = []
    for trial, perm_seed in enumerate([1, 2]):
        order = np.random.default_rng(perm_seed).permutation(n)  # rows scattered differently
        ds = ray.data.from_items([{"id": int(i), "x": float(i)} for i in order],
                                 override_num_blocks=5)
        out = tmp_path / f"t{trial}"
        out.mkdir()
        cfg = RayConfig(num_workers=2, cpus_per_worker=0.5, torch_threads=1)
        assert cfg.deterministic  # the default
        fit_torch_trainer(_recorder(str(out)), train_config={"ray": cfg.__dict__},
                          ray_cfg=cfg, name=f"t{trial}", storage=tmp_path / "ray",
                          datasets={"transfer": ds})
        seen.append([json.loads((out / f"rank{r}.json").read_text()) for r in range(2)])
    assert sorted(seen[0][0] + seen[0][1]) == list(range(n))  # every row once
    assert seen[0] == seen[1]  # same rows, same workers, same order
