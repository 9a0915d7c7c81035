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


def test_parquet_read_into_memory_is_sorted_and_equals_the_stream(tmp_path, ray_local):
    """read_parquet_dataset under a materialize share holds the rows in the object store, sorted
    by id, with the same content as the streamed read; prepare_datasets keeps that dataset as it
    is and sorts a materialised one whose blocks are out of order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data
    from ray.data.dataset import MaterializedDataset

    from tskd.stages.ray_train import prepare_datasets, read_parquet_dataset

    order = np.random.default_rng(0).permutation(30)
    folder = tmp_path / "pq"
    folder.mkdir()
    for k, part in enumerate(np.array_split(order, 3)):  # three files, ids scattered
        pq.write_table(pa.table({"id": part.astype(np.int64), "x": part * 2.0,
                                 "y": part * 3.0}), folder / f"part{k}.parquet")

    held = read_parquet_dataset(folder, columns=["id", "x"], materialize_share=1.0)
    assert isinstance(held, MaterializedDataset)
    rows = held.take_all()
    assert [r["id"] for r in rows] == list(range(30))
    assert [r["x"] for r in rows] == [2.0 * i for i in range(30)]
    assert held.columns() == ["id", "x"]

    streamed = read_parquet_dataset(folder, columns=["id", "x"], materialize_share=0.0)
    assert not isinstance(streamed, MaterializedDataset)
    assert sorted((r["id"], r["x"]) for r in streamed.take_all()) == \
        [(r["id"], r["x"]) for r in rows]
    # the store's share decides: a share too small for the data streams
    assert not isinstance(read_parquet_dataset(folder, materialize_share=1e-12),
                          MaterializedDataset)

    cfg = RayConfig()
    prepared, _ = prepare_datasets({"a": held}, cfg)
    assert prepared["a"] is held  # already in order: nothing re-done
    scattered = ray.data.from_items([{"id": int(i)} for i in order], override_num_blocks=4)
    prepared, _ = prepare_datasets({"b": scattered}, cfg)
    assert isinstance(prepared["b"], MaterializedDataset)
    assert [r["id"] for r in prepared["b"].take_all()] == list(range(30))


@pytest.mark.parametrize("total, trials, cpu, workers, fragment", [
    (2.0, 1, 0.5, (1, 1.0), None),                  # the demo grid on 2 cores: room 1.5
    (2.0, 2, 0.25, (1, 1.0), None),                 # the shipped searches on 2 cores: room 1.5
    (2.0, 2, 1.0, (1, 1.0), "hold 2 of the cluster's 2 CPUs, leaving 0"),
    (2.0, 1, 1.0, (1, 1.0), "leaving 1: a stage needs more than 1"),
    (8.0, 1, 1.0, (4, 2.0), "at least 8 for its Ray Train workers"),
])
def test_trials_must_leave_room_for_a_stage(monkeypatch, total, trials, cpu, workers, fragment):
    """``tskd grid`` / ``tskd tune`` refuse, before any trial starts, trials whose own CPUs
    leave no room for a stage (every trial would wait forever for its first stage)."""
    import ray

    from tskd.config import ConfigError
    from tskd.stages.ray_train import check_trial_room

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": total})
    ray_cfg = RayConfig(num_workers=workers[0], cpus_per_worker=workers[1])
    fields = ("max_concurrent", "resources_per_cell.cpu")
    if fragment is None:
        check_trial_room(ray_cfg, trials=trials, cpu_per_trial=cpu, fields=fields)
        return
    with pytest.raises(ConfigError, match=f"max_concurrent={trials} trials x "
                                          f"resources_per_cell.cpu={cpu:g} CPU") as err:
        check_trial_room(ray_cfg, trials=trials, cpu_per_trial=cpu, fields=fields)
    assert fragment in str(err.value)
