"""The tskd command line: validation before Ray starts, demo data, resolved config."""

import json
import subprocess
import sys

import yaml

from tskd.cli import format_table, main


def test_bad_override_fails_before_ray(capsys, monkeypatch):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("ray.init must not be called for an invalid config")

    monkeypatch.setattr(ray, "init", no_ray)
    assert main(["run", "--set", "distill.w_logits=-1"]) == 2
    err = capsys.readouterr().err
    assert "distill.w_logits: invalid value -1.0; allowed: a number >= 0" in err
    assert main(["run", "--set", "teacher.lora.rnk=4"]) == 2
    assert "teacher.lora.rnk: unknown key" in capsys.readouterr().err


def test_missing_inputs_fail_before_ray(tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    assert main(["run", "--set", f"data.root={tmp_path}"]) == 2
    assert "data.root" in capsys.readouterr().err
    assert main(["run", "--set", "teacher.arch=vit_b",
                 "--set", f"teacher.checkpoint={tmp_path / 'nope.pth'}"]) == 2
    assert "teacher.checkpoint" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "--set", "distill.epochs=3"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["distill"]["epochs"] == 3
    assert resolved["distill"]["w_hidden"] == 0.1


def test_demo_data_writes_a_valid_dataset(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tskd.cli", "demo-data", str(tmp_path / "d"),
                          "--n-images", "24", "--size", "32"], capture_output=True, text=True,
                         check=True)
    assert "24 images" in out.stdout
    from tskd.data.format import validate_dataset

    info = validate_dataset(tmp_path / "d")
    assert len(info.case_ids) == 24
    assert json.loads((tmp_path / "d" / "dataset.json").read_text())["labels"]["2"] == "lesion"


def test_format_table_lists_every_model_and_class():
    scores = {"dice": 0.5, "hd95": 3.25, "miou": 0.4,
              "per_class": {"organ": {"dice": 0.7}, "lesion": {"dice": 0.3}}}
    table = format_table({"teacher": scores, "students": {"ts_kd": scores, "scratch": scores},
                          "hd95_unit": "mm"})
    lines = table.splitlines()
    assert lines[0].split() == ["model", "Dice", "HD95", "(mm)", "mIoU", "Dice", "organ", "Dice",
                                "lesion"]
    assert [line.split()[1] for line in lines[2:]] == ["(LoRA", "ts_kd", "scratch"]
    assert "3.25" in lines[2] and "0.3000" in lines[3]
    # the label-only reference is its own row, last
    ref = dict(scores, dice=0.875, arch="basic_unet")
    lines = format_table({"teacher": scores, "students": {"ts_kd": scores}, "reference": ref,
                          "hd95_unit": "mm"}).splitlines()
    assert lines[-1].split()[:5] == ["reference", "basic_unet", "(labels", "only)", "0.8750"]
    assert len(lines) == 5


def _no_ray(monkeypatch):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("ray.init must not be called for bad inputs")

    monkeypatch.setattr(ray, "init", no_ray)


def test_wrong_checkpoint_arch_fails_before_ray(tmp_path, capsys, monkeypatch):
    import torch

    from tskd.models.sam import build_sam

    _no_ray(monkeypatch)
    path = tmp_path / "tiny.pth"
    torch.save(build_sam("sam_tiny", num_classes=3, img_size=32).state_dict(), path)
    code = main(["run", "--set", "teacher.arch=sam_demo", "--set", f"teacher.checkpoint={path}",
                 "--set", f"output_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert str(path) in err and "'sam_demo'" in err and "'sam_tiny'" in err
    assert err.startswith("tskd: config error: teacher.checkpoint:")


def test_student_block_outside_the_vit_fails_before_ray(tmp_path, capsys, monkeypatch):
    _no_ray(monkeypatch)
    code = main(["run", "--set", "distill.student_block=-13",
                 "--set", f"output_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("tskd: config error: distill.student_block: invalid value -13;")
    assert "-12 .. 11" in err


def test_checkpoint_check_accepts_fitting_files_and_rejects_garbage(tmp_path):
    import pytest
    import torch

    from tskd.cli import check_teacher_checkpoint
    from tskd.config import ConfigError
    from tskd.models.sam import build_sam

    sd = build_sam("sam_tiny", num_classes=3, img_size=32).state_dict()
    torch.save(sd, tmp_path / "plain.pth")
    torch.save({"model": sd}, tmp_path / "wrapped.pth")
    # another input size and class count are adapted by the teacher stage: accepted here too
    check_teacher_checkpoint(tmp_path / "plain.pth", "sam_tiny", img_size=64, num_classes=5)
    check_teacher_checkpoint(tmp_path / "wrapped.pth", "sam_tiny", img_size=32, num_classes=3)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ConfigError, match="cannot read .*junk.pth"):
        check_teacher_checkpoint(tmp_path / "junk.pth", "sam_tiny", img_size=32, num_classes=3)
    torch.save({"a": 1}, tmp_path / "dict.pth")
    with pytest.raises(ConfigError, match="not a SAM state dict"):
        check_teacher_checkpoint(tmp_path / "dict.pth", "sam_tiny", img_size=32, num_classes=3)


def test_invalid_dataset_fails_before_ray(tmp_path, capsys, monkeypatch):
    from tskd.data.demo import write_demo_dataset

    _no_ray(monkeypatch)
    root = write_demo_dataset(tmp_path / "d", n_images=24, size=32, seed=0)
    victim = sorted((root / "masks").iterdir())[3]
    victim.unlink()
    code = main(["run", "--set", f"data.root={root}", "--set", "data.n_labels=6",
                 "--set", "data.val_share=0.25", "--set", f"output_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("tskd: dataset error:") and victim.stem in err


def test_format_table_footer_names_the_conventions():
    scores = {"dice": 0.5, "hd95": 3.25, "miou": 0.4,
              "per_class": {"background": {"miou": 0.9}, "organ": {"dice": 0.7, "miou": 0.5}}}
    results = {"teacher": scores, "students": {"scratch": scores}, "hd95_unit": "pixels",
               "metrics": {"convention": "samed", "miou_includes_background": True,
                           "hd95_unit": "pixels"},
               "labelled_images": {"teacher": {"train": 30, "val": 10, "total": 40}},
               "seed": 3, "config_fingerprint": "abcdef0123456789"}
    lines = format_table(results).splitlines()
    assert lines[0].split() == ["model", "Dice", "HD95", "(pixels)", "mIoU", "Dice", "organ"]
    assert lines[-1] == ("samed empty-mask convention, mIoU with background, HD95 in pixels; "
                         "labels per model: 30 train + 10 val; seed 3; config abcdef0123456789")


def test_imagenet_mae_checkpoint_is_checked_before_ray(tmp_path, capsys, monkeypatch):
    import pytest
    import timm
    import torch

    from tskd.cli import check_vit_checkpoint
    from tskd.config import ConfigError, load_config

    _no_ray(monkeypatch)
    missing = tmp_path / "nope.pth"
    assert main(["run", "--set", "students=[scratch, imagenet_mae]",
                 "--set", f"imagenet_mae.checkpoint={missing}"]) == 2
    err = capsys.readouterr().err
    assert "imagenet_mae.checkpoint" in err and str(missing) in err
    # a ViT-Tiny MAE checkpoint (224 px, MAE-lite layout) fits the 128 px student: accepted
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    path = tmp_path / "mae_tiny.pth.tar"
    torch.save({"model": {f"module.model.{k}": v for k, v in vit.state_dict().items()}}, path)
    args = ["students=[scratch, imagenet_mae]", f"imagenet_mae.checkpoint={path}"]
    check_vit_checkpoint(load_config(None, args))
    # a ViT-Small one does not
    small = timm.create_model("vit_small_patch16_224", num_classes=0, depth=1)
    torch.save(small.state_dict(), path)
    with pytest.raises(ConfigError, match=r"^imagenet_mae.checkpoint: .*mae_tiny.pth.tar"):
        check_vit_checkpoint(load_config(None, args))


def test_a_local_ray_runs_train_without_the_node_drain_watcher(monkeypatch):
    """Train V2's preemption watcher (one actor per Train run) is off on the local Ray tskd
    starts, where no node can be drained, and left to Ray's default on a cluster."""
    import os

    import ray

    from tskd.cli import _init_ray
    from tskd.config import ExperimentConfig

    calls = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    _init_ray(ExperimentConfig())
    assert "address" not in calls[-1]  # a local Ray was started
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    _init_ray(ExperimentConfig())
    assert calls[-1]["address"] == "127.0.0.1:6379"
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ
