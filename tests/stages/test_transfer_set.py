"""Stage ``transfer`` end to end on a tiny config under a real local Ray (``ray_local``): the
data stage, the ``ddpm`` stage (a real 5-step DDPM), then the transfer stage sampling from it."""

import json
import shutil

import numpy as np
import pytest

from tskd.artifacts import StageContext
from tskd.config import load_config
from tskd.data.dataset import load_arrays
from tskd.stages import data_stage, ddpm, transfer_set
from tskd.stages.transfer_set import (TransferSetError, load_transfer_images, read_transfer_set,
                                      sample_transfer_set)
from tskd.data.augment import augment_copies
from tskd.transfer_quality import nearest_neighbours, privacy_references

TINY = [
    "data.demo.n_images=20", "data.demo.size=32", "data.image_size=32",
    "data.n_labels=8", "data.val_share=0.25",
    "transfer.n_images=10", "transfer.diffusion.image_size=16",
    "transfer.diffusion.n_augmented=16", "transfer.diffusion.train_steps=5",
    "transfer.diffusion.batch_size=4", "transfer.diffusion.num_inference_steps=2",
    "transfer.diffusion.block_out_channels=[16,32]", "transfer.sample_batch_size=4",
    "transfer.num_actors=2", "transfer.actor_cpus=0.5", "transfer.near_copy_psnr=99",
    "ray.cpus_per_worker=0.5", "ray.torch_threads=1",
]


def _cfg(tmp, *extra):
    return load_config(None, TINY + [f"output_dir={tmp}", *extra])


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local):
    """The data stage (6 labelled demo images at 32 px), the ddpm stage, the transfer stage.
    Returns (cfg, data dir, transfer dir, transfer metrics, labelled images, ddpm dir, ddpm
    metrics)."""
    tmp = tmp_path_factory.mktemp("transfer")
    cfg = _cfg(tmp)
    data_dir = tmp / "data"
    data_dir.mkdir()
    data_stage.run(StageContext("data", data_dir, {}, cfg))
    ddpm_dir = tmp / "ddpm"
    ddpm_dir.mkdir()
    ddpm_metrics = ddpm.run(StageContext("ddpm", ddpm_dir, {"data": data_dir}, cfg))
    out = tmp / "transfer"
    out.mkdir()
    metrics = transfer_set.run(StageContext("transfer", out,
                                            {"data": data_dir, "ddpm": ddpm_dir}, cfg))
    info, splits = data_stage.load_data(data_dir)
    train, _ = load_arrays(info, splits.labelled, 32)
    return cfg, data_dir, out, metrics, train, ddpm_dir, ddpm_metrics


def test_artifact_is_readable_and_consistent(built):
    cfg, _, out, metrics, train, ddpm_dir, ddpm_metrics = built
    assert len(train) == 6
    manifest = json.loads((out / "transfer.json").read_text())
    quality = json.loads((out / "quality.json").read_text())
    assert manifest["n_images"] == 10 and manifest["n_kept"] == 10 and manifest["n_dropped"] == 0
    assert manifest["image_size"] == 32 and manifest["dropped_ids"] == []
    assert manifest["grayscale"] is True  # the demo ultrasound is grayscale
    assert manifest["shards"] and all((out / s).is_file() for s in manifest["shards"])
    assert not (out / "ray").exists() and not (ddpm_dir / "ray").exists()  # Ray Train's storage
    # the model lives in the ddpm entry only; the transfer set names the entry it sampled
    assert (ddpm_dir / "model" / "unet").is_dir() and (ddpm_dir / "model" / "scheduler").is_dir()
    assert not (out / "model").exists() and manifest["ddpm_entry"] == ddpm_dir.name

    ds = read_transfer_set(out)
    assert set(ds.columns()) == {"id", "image", "nn_index", "nn_mse", "nn_psnr", "nn_kind",
                                 "source"}
    assert manifest["n_synthetic"] == 10 and manifest["n_unlabelled"] == 0
    rows = sorted(ds.take_all(), key=lambda r: r["id"])
    assert len(rows) == manifest["n_kept"] == metrics["transfer/n_images"]
    assert [r["id"] for r in rows] == list(range(10))
    assert rows[0]["image"].shape == (32, 32, 3) and rows[0]["image"].dtype == np.uint8

    images, ids = load_transfer_images(out, with_ids=True)
    assert images.shape == (10, 32, 32, 3) and ids.tolist() == list(range(10))
    np.testing.assert_array_equal(images, np.stack([r["image"] for r in rows]))
    assert (images == images[..., :1]).all()  # R = G = B
    # the stored quality columns are the nearest neighbours among the labelled images, their
    # flips and the DDPM's augmented training copies
    d = cfg.transfer.diffusion
    augmented = augment_copies(train, d.n_augmented, seed=cfg.seed, strength=d.augment_strength)
    refs, ref_index, ref_kind = privacy_references(train, augmented)
    assert len(refs) == 3 * 6 + 16 - 6
    ref, mse, psnr = nearest_neighbours(images, refs)
    np.testing.assert_array_equal([r["nn_index"] for r in rows], ref_index[ref])
    assert [r["nn_kind"] for r in rows] == list(ref_kind[ref])
    assert {r["source"] for r in rows} == {"synthetic"}
    np.testing.assert_allclose([r["nn_mse"] for r in rows], mse)
    np.testing.assert_allclose([r["nn_psnr"] for r in rows], psnr)
    assert quality["all"]["n"] == 10 and quality["n_kept"] == 10
    assert quality["all"]["mse"]["mean"] == pytest.approx(mse.mean())
    assert metrics["transfer/psnr_mean"] == pytest.approx(psnr.mean())
    assert metrics["transfer/mse_mean"] == pytest.approx(mse.mean())
    assert metrics["transfer/n_dropped"] == 0 and np.isfinite(ddpm_metrics["diffusion/final_loss"])
    assert not any(k.startswith("diffusion/") for k in metrics)  # the ddpm stage's metrics
    # the ddpm entry keeps what the DDPM trained on: the privacy references above
    trained = json.loads((ddpm_dir / "ddpm.json").read_text())
    assert trained == {"n_train_images": 6, "crops_per_image": 1, "n_crops": 6,
                       "n_augmented": 16, "train_image_size": 32, "image_size": 16,
                       "train_steps": 5, "model_dir": "model",
                       "training_images": "training_images.npz", "seed": 0}
    stored = ddpm.training_images(ddpm_dir)
    np.testing.assert_array_equal(stored.labelled, train)
    np.testing.assert_array_equal(stored.augmented, augmented)
    info, splits = data_stage.load_data(built[1])
    assert stored.crops_per_image == 1 and stored.case_ids == list(splits.labelled)


def _rerun(built, tmp, monkeypatch, *overrides, resample=False):
    """Run the transfer stage again on the ddpm entry of ``built`` (no DDPM trains); unless
    ``resample``, its samples are reused too (only filtering and writing run)."""
    cfg0, data_dir, out0, metrics0, _, ddpm_dir, _ = built

    def must_not_train(*args):
        raise AssertionError("the transfer stage trained a DDPM")

    monkeypatch.setattr(ddpm, "train_diffusion", must_not_train)
    if not resample:
        monkeypatch.setattr(transfer_set, "sample_transfer_set",
                            lambda *a: read_transfer_set(out0).materialize())
    out = tmp / "transfer"
    out.mkdir()
    cfg = _cfg(tmp, *overrides)
    return out, transfer_set.run(StageContext("transfer", out,
                                              {"data": data_dir, "ddpm": ddpm_dir}, cfg))


def test_one_actor_gives_the_same_images_and_near_copies_are_dropped(built, tmp_path,
                                                                     monkeypatch):
    out0 = built[2]
    reference = {r["id"]: r for r in read_transfer_set(out0).take_all()}
    psnr = np.array([reference[i]["nn_psnr"] for i in range(10)])
    threshold = float(np.sort(psnr)[6])  # the 4 highest PSNRs (ties aside) are near-copies
    out, metrics = _rerun(built, tmp_path, monkeypatch, "transfer.num_actors=1",
                          f"transfer.near_copy_psnr={threshold}", resample=True)
    dropped = np.flatnonzero(psnr >= threshold).tolist()
    assert 0 < len(dropped) < 10
    manifest = json.loads((out / "transfer.json").read_text())
    assert manifest["dropped_ids"] == dropped and manifest["n_kept"] == 10 - len(dropped)
    assert metrics["transfer/n_images"] == 10 - len(dropped)
    assert metrics["transfer/n_dropped"] == len(dropped)
    assert metrics["transfer/psnr_mean"] == pytest.approx(psnr[psnr < threshold].mean())
    images, ids = load_transfer_images(out, with_ids=True)
    assert ids.tolist() == sorted(set(range(10)) - set(dropped))
    # 1 actor here, 2 in the fixture: bit-identical images
    np.testing.assert_array_equal(images, np.stack([reference[i]["image"] for i in ids]))
    quality = json.loads((out / "quality.json").read_text())
    assert [c["index"] for c in quality["all"]["near_copies"]] == dropped


def test_every_sample_a_near_copy_is_a_clear_error(built, tmp_path, monkeypatch):
    # PSNR of 8-bit images is >= 0 dB, so a 0 dB threshold flags every sample
    with pytest.raises(TransferSetError, match=r"every one of the 10 .*near_copy_psnr=0.0"):
        _rerun(built, tmp_path, monkeypatch, "transfer.near_copy_psnr=0")
    quality = json.loads((tmp_path / "transfer" / "quality.json").read_text())
    assert quality["n_kept"] == 0 and quality["all"]["n_near_copies"] == 10
    assert not (tmp_path / "transfer" / "transfer.json").exists()


def test_keeping_near_copies_when_asked(built, tmp_path, monkeypatch):
    out, metrics = _rerun(built, tmp_path, monkeypatch, "transfer.near_copy_psnr=0",
                          "transfer.drop_near_copies=false")
    manifest = json.loads((out / "transfer.json").read_text())
    assert manifest["n_kept"] == 10 and len(manifest["near_copy_ids"]) == 10
    assert metrics["transfer/n_images"] == 10 and metrics["transfer/n_dropped"] == 0


def test_actor_requests_leave_a_cpu_to_ray_datas_tasks(built, monkeypatch):
    """Actors that would take every CPU ask for less (their threads, and so the samples, stay);
    with no CPU beside Ray Data's tasks at all the stage is refused, naming the fields."""
    import ray

    cfg, _, out, *_ = built
    total = ray.cluster_resources()["CPU"]  # 4 (ray_local)
    greedy = _cfg(out.parent, "transfer.num_actors=4", "transfer.actor_cpus=1")
    assert transfer_set.actor_cpu_request(greedy) == pytest.approx((total - 1) / 4)
    assert transfer_set.actor_cpu_request(cfg) == 0.5  # fits: as configured
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0})
    with pytest.raises(TransferSetError, match="leave no room for transfer.num_actors=2"):
        transfer_set.actor_cpu_request(cfg)


def test_sampling_inside_a_trial_that_holds_cpus(built):
    """A ``tskd grid`` cell or ``tskd tune`` trial runs the stage from a Tune trial that holds
    CPUs. The actors' request leaves one CPU to Ray Data's tasks beside what the caller holds:
    before, an actor of ``actor_cpus=1`` next to a caller holding all but 1.5 of the CPUs waited
    forever for its read tasks. Same samples as outside."""
    import ray

    cfg, _, out, _, train, ddpm_dir, _ = built
    total = ray.cluster_resources()["CPU"]
    one = _cfg(out.parent, "transfer.num_actors=1", "transfer.actor_cpus=1")

    @ray.remote(num_cpus=total - 1.5)
    def in_a_trial(config, model_dir, images):
        request = transfer_set.actor_cpu_request(config)
        ds = sample_transfer_set(model_dir, images, config)
        return request, ds.select_columns(["id", "image"]).to_pandas()

    request, rows = ray.get(in_a_trial.remote(one, ddpm_dir / "model", train), timeout=300)
    assert request == pytest.approx(0.5)  # total - (total - 1.5) - 1
    outside = sample_transfer_set(ddpm_dir / "model", train, one).select_columns(
        ["id", "image"]).to_pandas()
    rows, outside = rows.sort_values("id"), outside.sort_values("id")
    assert list(rows["id"]) == list(outside["id"]) == list(range(10))
    assert all(np.array_equal(a, b) for a, b in zip(rows["image"], outside["image"]))


@pytest.mark.parametrize("overrides, cpus, match", [
    (["transfer.num_actors=1"], 1.0, "leave no room"),
    (["ray.use_gpu=true", "transfer.num_actors=1"], None, "request a GPU .* has 0"),
])
def test_sampler_resources_are_checked_before_the_ddpm_trains(built, tmp_path, monkeypatch,
                                                              overrides, cpus, match):
    """The ddpm stage checks the transfer stage's sampler actors first: a configuration that
    cannot sample fails before the DDPM trains (and nothing is written)."""
    import ray

    data_dir = built[1]
    if cpus is not None:  # a cluster with no CPU beside Ray Data's read / write tasks
        monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": cpus})

    def must_not_train(*args):
        raise AssertionError("the DDPM trained before the sampler's resources were checked")

    monkeypatch.setattr(ddpm, "train_diffusion", must_not_train)
    out = tmp_path / "ddpm"
    out.mkdir()
    cfg = _cfg(tmp_path, *overrides)
    with pytest.raises(TransferSetError, match=match):
        ddpm.run(StageContext("ddpm", out, {"data": data_dir}, cfg))
    assert not any(out.iterdir())


def test_real_unlabelled_images_join_the_transfer_set(built, tmp_path, monkeypatch):
    data_dir = built[1]
    info, splits = data_stage.load_data(data_dir)
    assert len(splits.unlabelled) >= 5  # the train split minus a budget of 8
    out, metrics = _rerun(built, tmp_path, monkeypatch,
                          "transfer.sources=[synthetic, unlabelled]", "transfer.n_unlabelled=5")
    manifest = json.loads((out / "transfer.json").read_text())
    assert manifest["n_synthetic"] == 10 and manifest["n_unlabelled"] == 5
    assert manifest["n_kept"] == 15 == metrics["transfer/n_images"]
    chosen = manifest["unlabelled_case_ids"]
    assert len(set(chosen)) == 5 and set(chosen) <= set(splits.unlabelled)
    rows = sorted(read_transfer_set(out).take_all(), key=lambda r: r["id"])
    assert [r["source"] for r in rows] == ["synthetic"] * 10 + ["unlabelled"] * 5
    assert [r["id"] for r in rows] == list(range(15))
    real, _ = load_arrays(info, chosen, 32)
    np.testing.assert_array_equal(np.stack([r["image"] for r in rows[10:]]), real)
    assert all(r["nn_index"] == -1 and np.isnan(r["nn_psnr"]) for r in rows[10:])
    images = load_transfer_images(out)
    assert images.shape == (15, 32, 32, 3)


def test_unlabelled_only_trains_no_diffusion_model(built, tmp_path, monkeypatch):
    data_dir = built[1]
    info, splits = data_stage.load_data(data_dir)

    def no_ddpm(*a, **k):
        raise AssertionError("the DDPM must not be trained without synthetic images")

    monkeypatch.setattr(ddpm, "train_diffusion", no_ddpm)
    monkeypatch.setattr(transfer_set, "sample_transfer_set", no_ddpm)
    out = tmp_path / "transfer"
    out.mkdir()
    cfg = _cfg(tmp_path, "transfer.sources=[unlabelled]")
    # no ddpm input at all (the pipeline plans none: tests/test_pipeline.py)
    metrics = transfer_set.run(StageContext("transfer", out, {"data": data_dir}, cfg))
    manifest = json.loads((out / "transfer.json").read_text())
    n_unl = len(splits.unlabelled)
    assert manifest["n_kept"] == n_unl == metrics["transfer/n_images"]  # all of them (null)
    assert sorted(manifest["unlabelled_case_ids"]) == list(splits.unlabelled)
    assert not (out / "model").exists()
    images, ids = load_transfer_images(out, with_ids=True)
    assert ids.tolist() == list(range(n_unl))
    np.testing.assert_array_equal(images,
                                  load_arrays(info, manifest["unlabelled_case_ids"], 32)[0])
    # no unlabelled image left: a clear error
    n_train = len(splits.labelled) + len(splits.val) + n_unl
    cfg_all = _cfg(tmp_path, "transfer.sources=[unlabelled]", f"data.n_labels={n_train}")
    d2 = tmp_path / "data2"
    d2.mkdir()
    data_stage.run(StageContext("data", d2, {}, cfg_all))
    (tmp_path / "t2").mkdir()
    with pytest.raises(TransferSetError, match="no image outside the label budget"):
        transfer_set.run(StageContext("transfer", tmp_path / "t2", {"data": d2}, cfg_all))


def test_patch_training_gives_a_transfer_set_of_patches(built, tmp_path, monkeypatch):
    """data.patch_size 16 < data.image_size 32: the DDPM gets 16-px crops of the labelled
    images (4 per image), its samples and the unlabelled images' crops are 16 px."""
    _, data_dir, _, _, train, built_ddpm, _ = built
    info, splits = data_stage.load_data(data_dir)
    seen = {}

    def fake_train(images, cfg, model_dir, storage):  # reuse the built DDPM, record its input
        seen["images"] = images
        shutil.copytree(built_ddpm / "model", model_dir)
        return {"diffusion/final_loss": 0.0, "diffusion/first_loss": 0.0}

    monkeypatch.setattr(ddpm, "train_diffusion", fake_train)
    cfg = _cfg(tmp_path, "data.patch_size=16", "reference.arch=none",
               "transfer.sources=[synthetic, unlabelled]",
               "transfer.n_unlabelled=2", "transfer.diffusion.n_augmented=24")
    ddpm_dir = tmp_path / "ddpm"
    ddpm_dir.mkdir()
    ddpm.run(StageContext("ddpm", ddpm_dir, {"data": data_dir}, cfg))
    out = tmp_path / "transfer"
    out.mkdir()
    transfer_set.run(StageContext("transfer", out, {"data": data_dir, "ddpm": ddpm_dir}, cfg))
    assert seen["images"].shape == (24, 16, 16, 3)  # augmented copies of 4 crops x 6 images
    trained = json.loads((ddpm_dir / "ddpm.json").read_text())
    assert trained["crops_per_image"] == 4 and trained["n_crops"] == 24
    assert trained["train_image_size"] == 16
    stored = ddpm.training_images(ddpm_dir)
    np.testing.assert_array_equal(stored.augmented, seen["images"])
    assert stored.case_ids == [c for c in splits.labelled for _ in range(4)]
    for crop, case in zip(stored.labelled, stored.case_ids):  # each: a slice of its image
        src = train[list(splits.labelled).index(case)]
        assert any(np.array_equal(src[y:y + 16, x:x + 16], crop)
                   for y in range(17) for x in range(17))
    manifest = json.loads((out / "transfer.json").read_text())
    assert manifest["image_size"] == 16
    assert manifest["n_synthetic"] == 10 and manifest["n_unlabelled"] == 2 * 4
    cases = manifest["unlabelled_case_ids"]
    assert len(cases) == 8 and all(cases[i] == cases[i - i % 4] for i in range(8))
    images, ids = load_transfer_images(out, with_ids=True)
    assert images.shape == (18, 16, 16, 3) and ids.tolist() == list(range(18))
    whole = load_arrays(info, cases, 32)[0]
    for crop, src in zip(images[10:], whole):  # each unlabelled row: a slice of its image
        assert any(np.array_equal(src[y:y + 16, x:x + 16], crop)
                   for y in range(17) for x in range(17))
    quality = json.loads((out / "quality.json").read_text())
    assert "references at 16 px" in quality["compared_against"]
    assert f"{4 * len(train)} labelled training images (crops)" in quality["compared_against"]
    assert quality["train_case_ids"] == [c for c in splits.labelled for _ in range(4)]
