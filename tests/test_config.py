"""Config loading: defaults, YAML values, --set overrides, errors naming field/value/allowed."""

from pathlib import Path

import pytest
import yaml

from tskd.config import (SAM_ARCHS, ConfigError, ExperimentConfig, fingerprint, load_config,
                         parse_override, to_dict)

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_demo():
    cfg = load_config()
    assert cfg == ExperimentConfig()
    assert cfg.students == ["ts_kd", "ta_kd", "scratch"]
    assert (cfg.distill.w_logits, cfg.distill.w_hidden) == (0.2, 0.1)
    assert cfg.data.root is None and cfg.teacher.checkpoint is None


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("experiment: x\ndistill: {w_logits: 0.5, epochs: 3}\n")
    cfg = load_config(path, ["distill.epochs=7", "teacher.lora.alpha=8", "data.root=null"])
    assert cfg.experiment == "x"
    assert cfg.distill.w_logits == 0.5 and cfg.distill.epochs == 7
    assert cfg.teacher.lora.alpha == 8.0 and isinstance(cfg.teacher.lora.alpha, float)
    assert cfg.distill.w_hidden == 0.1  # untouched defaults survive a partial section


def test_exponent_notation_is_a_number_where_a_float_is_allowed(tmp_path):
    """PyYAML (YAML 1.1) reads ``3e-4`` as a string; a float field takes it as 0.0003."""
    path = tmp_path / "exp.yaml"
    path.write_text("distill: {lr: 3e-4}\nstudent_finetune: {lr: 1E-3, weight_decay: 5e-2}\n")
    cfg = load_config(path, ["teacher.finetune.lr=2.5e-3"])
    assert cfg.distill.lr == 3e-4 and isinstance(cfg.distill.lr, float)
    assert (cfg.student_finetune.lr, cfg.student_finetune.weight_decay) == (1e-3, 5e-2)
    assert cfg.teacher.finetune.lr == 2.5e-3
    for bad in ("distill.epochs=1e3", "distill.lr=e-4", "distill.lr=3e-"):  # ints stay ints
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])


def test_parse_override_yaml_values():
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    assert parse_override("students=[ts_kd, scratch]") == {"students": ["ts_kd", "scratch"]}
    assert parse_override("x=null") == {"x": None}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("distill.epochs")


def test_resources_per_worker_is_a_mapping_of_numbers():
    assert load_config(None, []).ray.resources_per_worker == {}
    cfg = load_config(None, ["ray.resources_per_worker={worker_node: 1, fast_disk: 0.5}"])
    assert cfg.ray.resources_per_worker == {"worker_node": 1.0, "fast_disk": 0.5}


@pytest.mark.parametrize("override, field, fragment", [
    ("distill.foo=1", "distill.foo", "unknown key"),
    ("nonsense=1", "nonsense", "unknown key"),
    ("distill.w_logits=abc", "distill.w_logits", "a number"),
    ("distill.epochs=1.5", "distill.epochs", "an integer"),
    ("distill.w_logits=-1", "distill.w_logits", ">= 0"),
    ("student_finetune.lr=0", "student_finetune.lr", "'auto' or a number > 0"),
    ("student_finetune.lr=fast", "student_finetune.lr", "'auto'"),
    ("student_finetune.weight_decay=-1", "student_finetune.weight_decay",
     "'auto' or a number >= 0"),
    ("teacher.arch=vit_q", "teacher.arch", "sam_demo"),
    ("teacher.arch=vit_b", "teacher.checkpoint", "official SAM checkpoint"),
    ("teacher.img_size=100", "teacher.img_size", "multiple of 16"),
    ("teacher.decoder=half", "teacher.decoder", "'full', 'lora', 'frozen'"),
    ("students=[ts_kd, nope]", "students", "ta_kd"),
    ("ray.backend=nccl", "ray.backend", "use_gpu"),
    ("ray.backend=mpi", "ray.backend", "'nccl'"),
    ("ray.resources_per_worker=[1]", "ray.resources_per_worker", "a mapping of a string to a number"),
    ("ray.resources_per_worker={worker_node: x}", "ray.resources_per_worker.worker_node", "a number"),
    ("ray.resources_per_worker={worker_node: 0}", "ray.resources_per_worker.worker_node", "> 0"),
    ("ray.resources_per_worker={GPU: 1}", "ray.resources_per_worker.GPU", "custom resources only"),
    ("data=3", "data", "mapping"),
    ("data.val_share=1", "data.val_share", "[0, 1)"),
    ("data.n_labels=1", "data.n_labels", "model_selection=false"),
    ("data.n_val=10", "data.n_val", "unknown key"),
    ("data.patch_size=8", "data.patch_size", "'auto' or an integer in [16, 2048]"),
    ("data.patch_size=big", "data.patch_size", "'auto'"),
    ("data.fg_fraction=1.5", "data.fg_fraction", "a number in [0, 1]"),
    ("data.fg_fraction=-0.1", "data.fg_fraction", "a number in [0, 1]"),
    ("transfer.sources=[]", "transfer.sources", "non-empty"),
    ("transfer.sources=[synthetic, synthetic]", "transfer.sources", "distinct"),
    ("transfer.sources=[real]", "transfer.sources[0]", "'unlabelled'"),
    ("transfer.n_unlabelled=0", "transfer.n_unlabelled", "null (all)"),
    ("student.img_size=120", "student.img_size", "multiple of patch_size"),
    ("transfer.diffusion.num_inference_steps=5000", "transfer.diffusion.num_inference_steps",
     "[1, num_train_timesteps"),
    ("student.arch=lstm", "student.arch", "'timm_unet', 'basic_unet', 'segresnet'"),
    ("student.model_name=resnet18", "student.model_name", "arch 'vit'"),
    ("reference.arch=lstm", "reference.arch", "'none' or one of ['vit'"),
    ("reference.epochs=0", "reference.epochs", "an integer >= 1"),
    ("reference.lr=0", "reference.lr", "a number > 0"),
    ("students=[scratch, imagenet_mae]", "imagenet_mae.checkpoint", "MAE-lite layout"),
    ("imagenet_mae.mismatch=drop", "imagenet_mae.mismatch", "'interpolate', 'skip'"),
    ("mae.mask_ratio=1", "mae.mask_ratio", "(0, 1)"),
    ("mae.decoder_dim=30", "mae.decoder_dim", "multiple of 4"),
    ("mocov3.batch_size=1", "mocov3.batch_size", ">= 2"),
    ("mocov3.momentum=1", "mocov3.momentum", "[0, 1)"),
    ("mocov3.temperature=0", "mocov3.temperature", "> 0"),
])
def test_errors_name_field_value_and_allowed(override, field, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert message.startswith(field + ":"), message
    assert fragment in message


@pytest.mark.parametrize("overrides, field, fragment", [
    (["student.arch=timm_unet", "student.encoder=vgg11"], "student.encoder", "'repvit_m0_9'"),
    (["student.arch=timm_unet", "student.img_size=48"], "student.img_size",
     "a multiple of 32 for arch 'timm_unet'"),
    (["student.arch=basic_unet", "student.img_size=72"], "student.img_size", "a multiple of 16"),
    (["data.image_size=100"], "reference.img_size", "a multiple of 16 for arch 'basic_unet'"),
    (["data.image_size=128", "data.patch_size=40"], "reference.img_size",
     "trains on the data.patch_size=40 patches"),
    (["reference.arch=timm_unet", "reference.encoder=vgg11"], "reference.encoder",
     "'resnet18'"),
    (["student.arch=basic_unet", "distill.student_block=3"], "distill.student_block",
     "-1 for student.arch 'basic_unet'"),
    (["student.patch_size=8", "student.head_stride=16"], "student.head_stride",
     "one of [4, 8] (<= patch_size=8)"),
])
def test_student_and_reference_errors(overrides, field, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(field + ":") and fragment in str(err.value), str(err.value)


def test_student_archs_relax_the_vit_rules():
    """model_name / patch_size rules bind only arch vit; each arch has its own size rule."""
    cfg = load_config(None, ["student.arch=segresnet", "student.model_name=x",
                             "student.img_size=80"])
    assert cfg.student.input_multiple == 16
    assert load_config(None, ["student.arch=timm_unet", "student.encoder=repvit_m0_9",
                              "student.img_size=96"]).student.input_multiple == 32
    assert load_config(None, ["student.patch_size=8"]).student.input_multiple == 8
    # the reference off: its size rule does not apply; null img_size = data.image_size
    off = load_config(None, ["data.image_size=100", "reference.arch=none"])
    assert off.reference.arch == "none"
    ref = load_config(None, ["data.image_size=96"]).reference
    assert ref.student(96).img_size == 96 and ref.student(96).arch == "basic_unet"


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("distill:\n  w_hidden: lots\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: distill\.w_hidden: invalid value 'lots'"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_shipped_job_configs_are_valid():
    for path in sorted((REPO / "jobs").glob("*.yaml")):
        if "axes" in (yaml.safe_load(path.read_text()) or {}):
            continue  # a grid file (tests/test_grid.py loads and expands those)
        cfg = load_config(path)
        assert cfg.experiment
    demo = load_config(REPO / "jobs" / "demo.yaml")
    assert to_dict(demo) == to_dict(ExperimentConfig())  # the demo YAML spells out the defaults
    paper = load_config(REPO / "jobs" / "kidneyus_vit_b.yaml")
    assert paper.teacher.arch == "vit_b" and paper.teacher.img_size == 1024
    assert paper.distill.epochs == 1600
    for path, engine in paper.engines().items():  # paper scale: ZeRO-2 + bf16 on GPUs
        if path == "teacher.pretrain.engine":
            continue  # demo teachers only: the paper's teacher is an official checkpoint
        assert (engine.kind, engine.zero_stage, engine.precision) == ("deepspeed", 2, "bf16"), path
    assert paper.transfer.diffusion.engine.clip_grad_norm == 1.0  # the section's own default


def test_arch_names_match_the_model_registry():
    from tskd.models.sam import SAM_ARCHS as MODEL_ARCHS

    assert set(SAM_ARCHS) == set(MODEL_ARCHS)
    from tskd.config import FINETUNE_AUTO, STUDENT_ARCHS

    assert set(FINETUNE_AUTO) == set(STUDENT_ARCHS)  # every student has fine-tuning defaults


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["distill.epochs=2", "teacher.lora.rank=8"])
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(path) == cfg


def test_fingerprint_is_stable_and_sensitive():
    a = fingerprint({"x": 1, "y": [1, 2]}, "s")
    assert a == fingerprint({"y": [1, 2], "x": 1}, "s")
    assert a != fingerprint({"x": 2, "y": [1, 2]}, "s")
    assert len(a) == 16


def test_validation_images_come_from_inside_the_label_budget():
    cfg = load_config(None, ["data.n_labels=40", "data.val_share=0.2"])
    assert cfg.data.n_val == 8  # 32 train + 8 validation = 40 labels in total
    assert load_config(None, ["data.n_labels=7", "data.val_share=0.1"]).data.n_val == 1
    assert load_config(None, ["data.n_labels=40", "data.model_selection=false"]).data.n_val == 0
    assert load_config(None, ["data.n_labels=40", "data.val_share=0"]).data.n_val == 0
    assert load_config(None, ["data.n_labels=1", "data.model_selection=false"]).data.n_val == 0


def test_kd_presets_are_table_8():
    """Table 8 of the paper (weights as its prose gives them; paper-facts.md)."""
    table = {  # preset: (logits loss, logits target, w_logits, w_hidden)
        "ts_kd1": ("mse", "squeezed", 0.2, 1.0), "ts_kd2": ("mse", "interpolated", 0.1, 1.0),
        "ts_kd3": ("mse", "teacher", 0.001, 1.0), "ts_kd4": ("ce", "interpolated", 1.0, 1.0),
        "ts_kd5": ("ce", "interpolated", 1.0, 0.1), "ts_kd6": ("mse", "interpolated", 0.1, 0.0),
        "ts_kd7": ("mse", "interpolated", 0.1, 0.1), "ts_kd8": ("mse", "interpolated", 0.2, 0.1),
    }
    for name, (loss, target, wl, wh) in table.items():
        d = load_config(None, [f"distill.preset={name}", "students=[ts_kd, scratch]"]).distill
        assert (d.logits_loss, d.logits_target, d.w_logits, d.w_hidden) == (loss, target, wl, wh)
    default = load_config().distill  # TS-KD8 is the default
    assert (default.logits_loss, default.logits_target, default.w_logits, default.w_hidden) == \
        table["ts_kd8"]


def test_kd_preset_conflicts_and_round_trip(tmp_path):
    with pytest.raises(ConfigError, match=r"^distill.w_logits: invalid value 0.5; allowed: 1.0, "
                                          r"the value distill.preset='ts_kd4' sets"):
        load_config(None, ["distill.preset=ts_kd4", "distill.w_logits=0.5"])
    # a config written out in full (defaults spelled out, e.g. jobs/demo.yaml) takes a preset
    full = load_config(Path(__file__).resolve().parents[1] / "jobs" / "demo.yaml",
                       ["distill.preset=ts_kd5"]).distill
    assert (full.w_logits, full.w_hidden, full.logits_loss) == (1.0, 0.1, "ce")
    with pytest.raises(ConfigError, match=r"^distill.preset: invalid value 'ts_kd9'"):
        load_config(None, ["distill.preset=ts_kd9"])
    # the resolved config (preset + the values it set) loads back unchanged
    cfg = load_config(None, ["distill.preset=ts_kd5"])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(path) == cfg


def test_task_agnostic_kd_needs_the_hidden_term():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["distill.w_hidden=0"])
    assert str(err.value).startswith("distill.w_hidden: invalid value 0.0; allowed: a number > 0 "
                                     "while students include 'ta_kd'")
    with pytest.raises(ConfigError, match="^distill.w_hidden"):
        load_config(None, ["distill.preset=ts_kd6"])  # logits only
    assert load_config(None, ["distill.preset=ts_kd6", "students=[ts_kd, scratch]"])


def test_vit_baselines_are_rejected_for_other_student_archs():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["student.arch=basic_unet", "students=[scratch, mae, mocov3]"])
    message = str(err.value)
    assert message.startswith("students:") and "['mae', 'mocov3']" in message
    assert "student.arch='basic_unet'" in message and "'vit'" in message
    # the same arms are fine with the ViT student; scratch and KD are fine with any arch
    assert load_config(None, ["students=[scratch, mae, mocov3]"]).students[1:] == ["mae", "mocov3"]
    assert load_config(None, ["student.arch=basic_unet", "students=[scratch, ts_kd]"])


def test_baseline_defaults_are_the_papers():
    cfg = load_config()
    assert cfg.students == ["ts_kd", "ta_kd", "scratch"]  # the baselines are opt-in
    assert (cfg.mae.mask_ratio, cfg.mae.batch_size, cfg.mae.base_lr, cfg.mae.weight_decay) == (
        0.75, 64, 1.5e-4, 0.05)
    m = cfg.mocov3
    assert (m.batch_size, m.base_lr, m.weight_decay, m.momentum, m.temperature) == (
        32, 1.5e-4, 0.1, 0.99, 0.2)
    from tskd.config import scaled_lr
    assert scaled_lr(1.5e-4, 64) == pytest.approx(3.75e-5)  # MAE: base × 64 / 256
def test_engine_defaults_distillation_runs_under_deepspeed_on_gpus():
    cfg = load_config(None, [])
    assert cfg.distill.engine.kind == "auto" and cfg.distill.engine.zero_stage == 2
    assert cfg.distill.engine.resolved_kind(use_gpu=True) == "deepspeed"
    assert cfg.distill.engine.resolved_kind(use_gpu=False) == "torch"
    assert cfg.student_finetune.engine.kind == "torch"
    assert cfg.student_finetune.engine.resolved_kind(use_gpu=True) == "torch"
    # a partial section fills in from the field's default, not the class's
    cfg = load_config(None, ["distill.engine.gradient_accumulation=2"])
    assert cfg.distill.engine.kind == "auto" and cfg.distill.engine.gradient_accumulation == 2
    assert cfg.distill.engine.zero_stage == 2


def test_auto_engine_refuses_deepspeed_settings_it_would_ignore_on_cpu():
    for override, field in [("distill.engine.offload_optimizer=true",
                             "distill.engine.offload_optimizer"),
                            ("distill.engine.raw={steps_per_print: 1}", "distill.engine.raw"),
                            ("distill.engine.optimizer=cpu_adam", "distill.engine.optimizer")]:
        with pytest.raises(ConfigError) as err:
            load_config(None, [override])
        assert str(err.value).startswith(field) and "kind: deepspeed" in str(err.value)
        # the same settings with DeepSpeed asked for explicitly pass this check
        cfg = load_config(None, [override, "distill.engine.kind=deepspeed",
                                 "distill.engine.optimizer=cpu_adam"])
        assert cfg.distill.engine.kind == "deepspeed"
    load_config(None, ["ray.use_gpu=true", "distill.engine.raw={steps_per_print: 1}"])


@pytest.mark.parametrize("override, field, allowed", [
    ("distill.engine.precision=bf16", "distill.engine.precision", "ray.use_gpu is false"),
    ("distill.engine.optimizer=fused_adam", "distill.engine.optimizer", "CUDA-only"),
    ("distill.engine.zero_stage=4", "distill.engine.zero_stage", "[0, 3]"),
    ("student_finetune.engine.zero_stage=2", "student_finetune.engine.zero_stage",
     "kind 'torch'"),
    ("student_finetune.engine.optimizer=cpu_adam", "student_finetune.engine.optimizer",
     "kind 'torch'"),
    ("distill.engine.offload_optimizer=true", "distill.engine.optimizer", "'cpu_adam'"),
    ("distill.engine.offload_params=true", "distill.engine.offload_params", "zero_stage is 3"),
    ("distill.engine.gradient_accumulation=0", "distill.engine.gradient_accumulation", ">= 1"),
    ("distill.engine.raw={no_such_key: 1}", "distill.engine.raw.no_such_key",
     "a DeepSpeed config key"),
    ("distill.engine.raw={bf16: {enabled: true}}", "distill.engine.raw.bf16",
     "distill.engine.precision"),
    ("distill.engine.raw={zero_optimization: {stage: 3}}",
     "distill.engine.raw.zero_optimization.stage", "distill.engine.zero_stage"),
    ("reference.engine.raw={steps_per_print: 1}", "reference.engine.raw", "kind 'torch'"),
    ("ray.max_failures=-1", "ray.max_failures", ">= 0"),
    ("ray.checkpoint_every=0", "ray.checkpoint_every", ">= 1"),
    ("ray.train_poll_s=0", "ray.train_poll_s", "seconds in (0, 60]"),
])
def test_engine_errors_name_the_field(override, field, allowed):
    with pytest.raises(ConfigError) as err:  # DeepSpeed's own checks: kind deepspeed explicitly
        load_config(None, ["distill.engine.kind=deepspeed", override])
    assert str(err.value).startswith(field) and allowed in str(err.value)


def test_gpu_engine_settings_are_accepted_with_gpus():
    cfg = load_config(None, ["ray.use_gpu=true", "distill.engine.precision=bf16",
                             "distill.engine.optimizer=fused_adam",
                             "distill.engine.raw={zero_optimization: {reduce_bucket_size: 5}}"])
    assert cfg.distill.engine.precision == "bf16"


def test_raw_keys_are_deepspeed_keys():
    """Every key ``engine.raw`` accepts is read somewhere in DeepSpeed's source."""
    import pathlib
    import re

    import deepspeed

    from tskd.config import DEEPSPEED_KEYS

    text = "".join(p.read_text(errors="ignore")
                   for p in pathlib.Path(deepspeed.__file__).parent.rglob("*.py"))
    missing = [k for k in DEEPSPEED_KEYS if not re.search(rf"[\"']{k}[\"']", text)]
    assert missing == []


def test_patch_size_resolves_and_stays_out_of_whole_image_fingerprints():
    """data.patch (the crop / window side): patch_size auto = min(image_size, max_image_size);
    an integer is capped at the image size. The data stage's slice names patch_size / fg_fraction only with patches, so a
    whole-image config keeps the slice (and fingerprint) it had before the fields existed."""
    import dataclasses

    from tskd.data.fingerprint import resolve_image_size
    from tskd.pipeline import plan

    demo = resolve_image_size(load_config(None, ["data.demo.size=96"]))
    assert (demo.data.image_size, demo.data.patch, demo.data.patches) == (96, 96, False)
    before = {k: v for k, v in dataclasses.asdict(demo.data).items()
              if k not in ("patch_size", "fg_fraction")}  # the slice as it was written
    assert plan(demo)[0].config == {"data": before}
    big = resolve_image_size(load_config(None, ["data.image_size=1024"]))
    assert (big.data.patch, big.data.patches) == (512, True)
    assert plan(big)[0].config["data"]["patch_size"] == 512  # auto, resolved in the slice
    crops = resolve_image_size(load_config(None, ["data.image_size=128", "data.patch_size=64",
                                                  "data.fg_fraction=0.5"]))
    assert crops.data.patch == 64 and crops.data.patches
    sliced = plan(crops)[0].config["data"]
    assert sliced["patch_size"] == 64 and sliced["fg_fraction"] == 0.5
    wide = resolve_image_size(load_config(None, ["data.image_size=128", "data.patch_size=256"]))
    assert wide.data.patch == 128 and not wide.data.patches
    # the reference (img_size null) trains at the patch size
    ref = [s for s in plan(crops) if s.name == "reference"][0]
    assert ref.config["patch_size"] == 64
