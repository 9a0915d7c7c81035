"""Student registry: every arch keeps the contract (shapes, hidden = the stride-16 map computed
independently from the library model, normalisation), trains through both KD terms, and agrees
with the config's names and size rules."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from tskd import config as config_mod
from tskd.config import StudentConfig, to_dict
from tskd.losses import KDLoss
from tskd.models.footprint import model_footprint
from tskd.models.sam import SamSegmenter, build_sam
from tskd.models.students import STUDENT_ARCHS, TIMM_ENCODERS, build_student

# ImageNet mean/std scaled to 0..255, written out independently of the code
MEAN = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)

# (config overrides, hidden stride) of every arch the issue names
CASES = {
    "vit16": ({"arch": "vit", "patch_size": 16, "decoder_dim": 16}, 16),
    "vit8": ({"arch": "vit", "patch_size": 8, "decoder_dim": 16}, 8),
    "resnet18": ({"arch": "timm_unet", "encoder": "resnet18"}, 16),
    "efficientnet_b0": ({"arch": "timm_unet", "encoder": "efficientnet_b0"}, 16),
    "repvit_m0_9": ({"arch": "timm_unet", "encoder": "repvit_m0_9"}, 16),
    "mobilevit_xxs": ({"arch": "timm_unet", "encoder": "mobilevit_xxs"}, 16),
    "basic_unet": ({"arch": "basic_unet"}, 16),
    "segresnet": ({"arch": "segresnet"}, 16),
}


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(img_size: int = 64, **kw) -> dict:
    return to_dict(StudentConfig(img_size=img_size, **kw))


def test_registry_names_match_the_config():
    assert config_mod.STUDENT_ARCHS == STUDENT_ARCHS
    assert config_mod.TIMM_ENCODERS == TIMM_ENCODERS


@pytest.mark.parametrize("case", list(CASES))
def test_forward_shapes_and_config_size_rule(case):
    overrides, stride = CASES[case]
    cfg = _cfg(64, **overrides)
    model = build_student(cfg, 3).eval()
    assert model.input_multiple == StudentConfig(**cfg).input_multiple
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64) * 255)
        odd = model(torch.rand(1, 3, 40, 56) * 255)  # resized to 64 inside, logits back
    assert out.logits.shape == (2, 3, 64, 64)
    assert out.hidden.shape == (2, model.hidden_dim, 64 // stride, 64 // stride)
    assert odd.logits.shape == (1, 3, 40, 56) and odd.hidden.shape[-1] == 64 // stride
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.hidden).all()


def _independent(model, arch: str, xn: torch.Tensor):
    """(logits, hidden) computed from the library modules themselves, not the wrapper."""
    if arch == "timm_unet":
        feats = model.encoder(xn)
        red = model.encoder.feature_info.reduction()
        return None, feats[red.index(16)]
    net = model.net
    if arch == "basic_unet":
        h = net.down_4(net.down_3(net.down_2(net.down_1(net.conv_0(xn)))))
        return net(xn), h
    h, _ = net.encode(xn)  # SegResNet: the deepest (stride-16) encoder map
    return net(xn), h


@pytest.mark.parametrize("case", ["resnet18", "repvit_m0_9", "basic_unet", "segresnet"])
def test_hidden_is_the_stride16_map_and_input_is_normalised(case):
    overrides, _ = CASES[case]
    model = build_student(_cfg(64, **overrides), 2).eval()
    x = torch.rand(2, 3, 64, 64) * 255
    with torch.no_grad():
        out = model(x)
        logits, hidden = _independent(model, overrides["arch"], (x - MEAN) / STD)
    torch.testing.assert_close(out.hidden, hidden, rtol=1e-4, atol=1e-4)
    if logits is not None:
        torch.testing.assert_close(out.logits, logits, rtol=1e-4, atol=1e-4)


def test_timm_unet_encoder_is_the_timm_model():
    model = build_student(_cfg(64, arch="timm_unet", encoder="efficientnet_b0"), 2)
    ref = timm.create_model("efficientnet_b0", features_only=True, pretrained=False)
    assert model.hidden_dim == 112  # efficientnet_b0's reduction-16 channels
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    assert n_enc == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("encoder", TIMM_ENCODERS)
def test_every_listed_timm_encoder_builds_at_stride_16(encoder):
    model = build_student(_cfg(32, arch="timm_unet", encoder=encoder), 2).eval()
    assert model.input_multiple == 32
    with torch.no_grad():
        out = model(torch.rand(1, 3, 32, 32) * 255)
    assert out.hidden.shape == (1, model.hidden_dim, 2, 2)
    assert out.logits.shape == (1, 2, 32, 32)


@pytest.fixture(scope="module")
def teacher_out():
    torch.manual_seed(1)
    teacher = SamSegmenter(build_sam("sam_tiny", num_classes=3, img_size=64)).eval()
    with torch.no_grad():
        out = teacher(torch.rand(2, 3, 64, 64) * 255)
    return teacher.hidden_dim, out


def _grads(model, kd, x, teacher_out):
    model.zero_grad(set_to_none=True)
    kd.zero_grad(set_to_none=True)
    loss, parts = kd(model(x), teacher_out)
    loss.backward()
    return loss, parts, {n for n, p in model.named_parameters()
                         if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("case", list(CASES))
def test_kd_step_reaches_the_student_through_both_terms(case, teacher_out):
    """TS-KD: the hidden term trains the encoder up to the stride-16 map (task-agnostic KD uses
    only it), the logits term the whole network; one AdamW step lowers the KD loss."""
    t_dim, t_out = teacher_out
    overrides, _ = CASES[case]
    model = build_student(_cfg(64, **overrides), 3).train()
    x = torch.rand(2, 3, 64, 64) * 255
    kd_hidden = KDLoss(model.hidden_dim, t_dim, w_logits=0.0, w_hidden=1.0)
    kd_logits = KDLoss(model.hidden_dim, t_dim, w_logits=1.0, w_hidden=0.0)
    _, parts_h, from_hidden = _grads(model, kd_hidden, x, t_out)
    _, parts_l, from_logits = _grads(model, kd_logits, x, t_out)
    assert set(parts_h) == {"kd/hidden"} and set(parts_l) == {"kd/logits"}
    # independent value of the logits term: MSE against the bilinearly upsampled teacher logits
    with torch.no_grad():
        up = torch.nn.functional.interpolate(t_out.logits, size=(64, 64), mode="bilinear",
                                             align_corners=False)
        expected = ((model(x).logits - up) ** 2).mean()
    torch.testing.assert_close(parts_l["kd/logits"], expected, rtol=1e-4, atol=1e-6)
    assert from_hidden and from_logits
    assert from_hidden <= from_logits  # the hidden map feeds the logits
    assert from_logits - from_hidden, "the decoder/head gets gradients from the logits term only"
    assert kd_hidden.proj.weight.grad is not None and kd_hidden.proj.weight.grad.abs().sum() > 0

    kd = KDLoss(model.hidden_dim, t_dim, w_logits=0.2, w_hidden=0.1)
    opt = torch.optim.AdamW(list(model.parameters()) + list(kd.parameters()), lr=1e-3)
    before, _ = kd(model(x), t_out)
    for _ in range(3):
        loss, _ = kd(model(x), t_out)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, _ = kd(model(x), t_out)
    assert after.item() < before.item()


def test_state_dict_round_trip_and_deepcopy_keep_the_hidden_hook():
    model = build_student(_cfg(32, arch="basic_unet"), 2).eval()
    clone = build_student(_cfg(32, arch="basic_unet"), 2).eval()
    clone.load_state_dict(model.state_dict())
    copied = copy.deepcopy(model)
    x = torch.rand(1, 3, 32, 32) * 255
    with torch.no_grad():
        a, b, c = model(x), clone(x), copied(x)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.hidden, c.hidden)


def test_unknown_arch_and_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="allowed: one of"):
        build_student({"arch": "lstm", "img_size": 64}, 2)
    with pytest.raises(ValueError, match="multiple of 32"):
        build_student(_cfg(48, arch="timm_unet"), 2)
    with pytest.raises(ValueError, match="multiple of 16"):
        build_student(_cfg(40, arch="basic_unet"), 2)
    with pytest.raises(ValueError, match="only the vit student selects a block"):
        build_student(_cfg(64, arch="basic_unet"), 2, hidden_block=5)


def test_footprint_counts_and_restores_threads():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    n = torch.get_num_threads()
    fp = model_footprint(model, 16, threads=2, runs=2)
    assert torch.get_num_threads() == n
    params = 3 * 4 * 9 + 4 + 4 + 4  # conv weight + bias, BN weight + bias
    assert fp.params == params
    # state dict: parameters + running mean/var (float32) + num_batches_tracked (int64)
    assert fp.size_mb == pytest.approx(((params + 8) * 4 + 8) / 1e6)
    assert fp.latency_ms > 0


def test_compare_latency_takes_turns_and_reports_medians():
    """Each model's forward advances a fake clock by its own costs; the models take turns
    (after one warm-up pass each) and each gets the median of its timed passes."""
    from tskd.models.footprint import compare_latency

    now, calls = [0.0], []

    class Costly(torch.nn.Module):
        def __init__(self, name: str, costs: list[float]):
            super().__init__()
            self.name, self.costs = name, iter(costs)

        def forward(self, x):
            calls.append((self.name, tuple(x.shape)))
            now[0] += next(self.costs)
            return x

    fast = Costly("fast", [9.0, 0.001, 0.003, 0.002])  # the warm-up pass is not timed
    slow = Costly("slow", [9.0, 0.050, 0.010, 0.030])
    n = torch.get_num_threads()
    got = compare_latency({"fast": (fast, 8), "slow": (slow, 16)}, threads=1, rounds=3,
                          clock=lambda: now[0])
    assert torch.get_num_threads() == n
    assert got == pytest.approx({"fast": 2.0, "slow": 30.0})
    assert [c[0] for c in calls] == ["fast", "slow"] * 4
    assert {c for c in calls} == {("fast", (1, 3, 8, 8)), ("slow", (1, 3, 16, 16))}
