"""SegmentationMetrics vs numpy set computations, medpy's hd95 and a scipy surface-distance HD95."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from medpy.metric.binary import hd95 as medpy_hd95
from monai.metrics import HausdorffDistanceMetric
from scipy import ndimage as ndi

from tskd.metrics import SegmentationMetrics, hd95


def _blob(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Random smooth blob(s) covering 5..40% of the image."""
    field = ndi.gaussian_filter(rng.random(shape), sigma=rng.uniform(2, 5))
    return field > np.quantile(field, rng.uniform(0.6, 0.95))


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed distances surface(a)->surface(b) and back; surface = mask minus its 4-conn. erosion."""
    sa = a & ~ndi.binary_erosion(a)
    sb = b & ~ndi.binary_erosion(b)
    d_ab = ndi.distance_transform_edt(~sb, sampling=spacing)[sa]
    d_ba = ndi.distance_transform_edt(~sa, sampling=spacing)[sb]
    return d_ab, d_ba


def _hd95_max_of_directed(a, b, spacing) -> float:  # MONAI's definition
    d_ab, d_ba = _surface_distances(a, b, spacing)
    return max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.int64))


def _metrics_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    m = SegmentationMetrics(2, spacing=spacing)
    m.update(_t(a)[None], _t(b)[None])
    return m.aggregate()["hd95"]


def _border_cases(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """Masks touching the image border (rows/columns/corners), thin lines, single pixels, full image."""
    h, w = 40, 56
    cases = []
    a = np.zeros((h, w), bool)
    a[:, :10] = True  # a whole border column band
    b = np.zeros((h, w), bool)
    b[:15, :] = True  # a whole border row band
    cases.append((a, b))
    a = np.zeros((h, w), bool)
    a[-12:, -9:] = True  # bottom-right corner
    b = np.zeros((h, w), bool)
    b[:7, :5] = True  # top-left corner
    cases.append((a, b))
    cases.append((np.ones((h, w), bool), b))  # the whole image: its surface is the image border
    a = np.zeros((h, w), bool)
    a[0, :] = True  # one-pixel line on the border
    b = np.zeros((h, w), bool)
    b[h // 2, 3:40] = True  # one-pixel line inside
    cases.append((a, b))
    a = np.zeros((h, w), bool)
    a[h - 1, w - 1] = True  # single corner pixel
    cases.append((a, b))
    for _ in range(4):  # random blobs cut by the border
        a, b = _blob(rng, (h, w)), _blob(rng, (h, w))
        a[:, :3] |= rng.random((h, 3)) < 0.7
        b[-2:, :] |= rng.random((2, w)) < 0.7
        cases.append((a, b))
    return cases


@pytest.mark.parametrize("anisotropic", [False, True])
def test_hd95_equals_medpy(anisotropic: bool) -> None:
    rng = np.random.default_rng(0 if anisotropic else 1)
    pairs = []
    for _ in range(24):
        shape = (int(rng.integers(32, 129)), int(rng.integers(32, 129)))
        pairs.append((_blob(rng, shape), _blob(rng, shape)))
    a = _blob(rng, (64, 64))
    pairs.append((a, a.copy()))  # identical: 0
    pairs += _border_cases(rng)
    n_border = sum(bool(x[[0, -1]].any() or x[:, [0, -1]].any()) for p in pairs for x in p)
    assert n_border >= 15  # plenty of masks touch the image border
    for a, b in pairs:
        spacing = (float(rng.uniform(0.2, 2.5)), float(rng.uniform(0.2, 2.5))) if anisotropic else None
        ref = medpy_hd95(a, b, voxelspacing=spacing)
        assert hd95(a, b, spacing) == pytest.approx(ref, rel=1e-9, abs=1e-12)
        assert hd95(b, a, spacing) == pytest.approx(ref, rel=1e-9, abs=1e-12)  # symmetric
        assert _metrics_hd95(a, b, spacing) == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_hd95_pixels_without_spacing_and_invalid_inputs() -> None:
    a = np.zeros((20, 30), bool)
    a[5:10, 5:10] = True
    b = np.zeros((20, 30), bool)
    b[5:10, 15:20] = True  # 10 px to the right. By hand: of the 32 pooled surface distances
    # 10 are 6 px, 4 each 7, 8, 9 px and 10 are 10 px, so the 95th percentile (index 29.45) is 10
    assert hd95(a, b) == pytest.approx(10.0, abs=1e-12)
    assert hd95(a, b, (1.0, 1.0)) == hd95(a, b)
    assert hd95(a, b, (3.0, 0.5)) == pytest.approx(5.0, abs=1e-12)  # 10 columns of 0.5 mm
    with pytest.raises(ValueError):
        hd95(a, np.zeros_like(b))
    with pytest.raises(ValueError):
        hd95(a, b[:, :10])


def test_monai_percentile_differs_from_medpy() -> None:
    """MONAI's HausdorffDistanceMetric(percentile=95) is the max of the two directed percentiles."""
    rng = np.random.default_rng(2)
    monai_hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    rel = []
    for i in range(12):
        shape = (int(rng.integers(32, 65)), int(rng.integers(32, 65)))
        spacing = None if i % 2 == 0 else (float(rng.uniform(0.3, 2.0)), float(rng.uniform(0.3, 2.0)))
        a, b = _blob(rng, shape), _blob(rng, shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # MONAI 1.6's own deprecated argument
            got_monai = float(monai_hd(_t(a)[None, None], _t(b)[None, None], spacing=spacing)[0, 0])
        monai_hd.reset()
        medpy = medpy_hd95(a, b, voxelspacing=spacing)
        assert hd95(a, b, spacing) == pytest.approx(medpy, rel=1e-9)
        # MONAI (float32) = max of the directed percentiles on the same surfaces ...
        assert got_monai == pytest.approx(_hd95_max_of_directed(a, b, spacing), rel=1e-4, abs=1e-4)
        rel.append((got_monai - medpy) / medpy)
    rel = np.array(rel)
    # ... which is never below the pooled percentile (up to float32 rounding), and above it here
    assert rel.min() > -1e-3
    assert (rel > 0.03).sum() >= 3 and rel.max() > 0.05


def _reference_scores(preds, targets, num_classes, spacing=None):
    """Numpy set Dice/IoU + medpy's hd95 with the documented empty-mask policy."""
    vals = {m: [[] for _ in range(num_classes)] for m in ("dice", "miou", "hd95")}
    for p, t in zip(preds, targets):
        h, w = p.shape
        sh, sw = spacing or (1.0, 1.0)
        diag = math.hypot((h - 1) * sh, (w - 1) * sw)
        for c in range(1, num_classes):
            a, b = p == c, t == c
            if not a.any() and not b.any():
                continue
            if a.any() != b.any():
                vals["dice"][c].append(0.0), vals["miou"][c].append(0.0), vals["hd95"][c].append(diag)
                continue
            inter, union = (a & b).sum(), (a | b).sum()
            vals["dice"][c].append(2 * inter / (a.sum() + b.sum()))
            vals["miou"][c].append(inter / union)
            vals["hd95"][c].append(medpy_hd95(a, b, voxelspacing=spacing))
    per_class = {m: [np.mean(v) if v else math.nan for v in vals[m][1:]] for m in vals}
    means = {m: float(np.nanmean(per_class[m])) for m in vals}
    return per_class, means


def _random_label_maps(rng, n, shape, num_classes):
    out = []
    for _ in range(n):
        lab = np.zeros(shape, dtype=np.int64)
        for c in range(1, num_classes):
            if rng.random() < 0.8:
                lab[_blob(rng, shape)] = c
        out.append(lab)
    return out


@pytest.mark.parametrize("spacing", [None, (0.7, 1.3)])
def test_dice_iou_hd95_per_class_and_means(spacing) -> None:
    rng = np.random.default_rng(1)
    C = 4
    targets = _random_label_maps(rng, 6, (40, 48), C)
    preds = _random_label_maps(rng, 6, (40, 48), C)
    preds[0] = targets[0].copy()  # one perfect image
    names = ["bg", "a", "b", "c"]
    m = SegmentationMetrics(C, class_names=names, spacing=spacing)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MONAI's empty-mask warnings must not leak
        m.update(_t(np.stack(preds[:4])), _t(np.stack(targets[:4])))  # two batches accumulate
        m.update(_t(np.stack(preds[4:])), _t(np.stack(targets[4:])))
    got = m.aggregate()
    per_class, means = _reference_scores(preds, targets, C, spacing)
    assert got["n_images"] == 6
    assert set(got["per_class"]) == {"a", "b", "c"}
    for metric in ("dice", "miou", "hd95"):
        tol = dict(rel=1e-9, abs=1e-12) if metric == "hd95" else dict(rel=1e-4, abs=1e-6)  # MONAI: float32
        assert got[metric] == pytest.approx(means[metric], **tol)
        for j, name in enumerate(["a", "b", "c"]):
            assert got["per_class"][name][metric] == pytest.approx(per_class[metric][j], **tol)


def test_empty_mask_policy_and_nan_exclusion() -> None:
    H, W, spacing = 32, 48, (0.5, 2.0)
    diag = math.hypot((H - 1) * 0.5, (W - 1) * 2.0)
    t0 = np.zeros((H, W), np.int64)
    t0[5:15, 5:15] = 1  # class 1 in GT only
    p0 = np.zeros((H, W), np.int64)
    p0[20:25, 30:40] = 3  # class 3 in prediction only; class 2 nowhere
    t1 = np.zeros((H, W), np.int64)
    t1[2:10, 2:10] = 1
    p1 = t1.copy()  # class 1 perfect; classes 2, 3 absent from both -> skipped
    m = SegmentationMetrics(4, spacing=spacing)
    m.update(_t(np.stack([p0, p1])), _t(np.stack([t0, t1])))
    r = m.aggregate()
    c1, c2, c3 = (r["per_class"][f"class_{c}"] for c in (1, 2, 3))
    assert c1["dice"] == pytest.approx(0.5) and c1["miou"] == pytest.approx(0.5)
    assert c1["hd95"] == pytest.approx(diag / 2)  # mean of diag (GT only) and 0 (perfect)
    assert c3 == pytest.approx({"dice": 0.0, "miou": 0.0, "hd95": diag}, rel=1e-12)  # counted once
    assert all(math.isnan(v) for v in c2.values())  # never present: NaN, excluded from means
    assert r["dice"] == pytest.approx(0.25)
    assert r["miou"] == pytest.approx(0.25)
    assert r["hd95"] == pytest.approx((diag / 2 + diag) / 2)


def test_nothing_scored_gives_nan() -> None:
    m = SegmentationMetrics(3)
    assert math.isnan(m.aggregate()["dice"]) and m.aggregate()["n_images"] == 0
    z = torch.zeros(2, 16, 16, dtype=torch.long)
    m.update(z, z)
    r = m.aggregate()
    assert r["n_images"] == 2 and all(math.isnan(r[k]) for k in ("dice", "hd95", "miou"))


def test_include_background() -> None:
    t = np.zeros((1, 20, 20), np.int64)
    t[0, 5:15, 5:15] = 1
    p = np.zeros_like(t)
    p[0, 5:15, 5:10] = 1
    m = SegmentationMetrics(2, include_background=True)
    m.update(_t(p), _t(t))
    r = m.aggregate()
    bg_t, bg_p = t[0] == 0, p[0] == 0
    bg_dice = 2 * (bg_t & bg_p).sum() / (bg_t.sum() + bg_p.sum())
    assert r["per_class"]["class_0"]["dice"] == pytest.approx(bg_dice)
    assert r["per_class"]["class_1"]["dice"] == pytest.approx(2 * 50 / 150)
    assert r["dice"] == pytest.approx((bg_dice + 2 * 50 / 150) / 2)


def test_fov_sets_outside_to_background() -> None:
    t = np.zeros((1, 24, 24), np.int64)
    t[0, 4:12, 4:12] = 1
    t[0, 18:22, 18:22] = 2  # class 2 only outside the FOV
    p = t.copy()
    p[0, 14:24, 0:6] = 1  # wrong prediction outside the FOV
    fov = torch.zeros(1, 24, 24, dtype=torch.bool)
    fov[0, :14, :14] = True
    m = SegmentationMetrics(3)
    m.update(_t(p), _t(t), fov=fov)
    r = m.aggregate()
    assert r["per_class"]["class_1"] == pytest.approx({"dice": 1.0, "miou": 1.0, "hd95": 0.0})
    assert all(math.isnan(v) for v in r["per_class"]["class_2"].values())
    m2 = SegmentationMetrics(3)
    m2.update(_t(p), _t(t))  # without the FOV the outside error counts
    assert m2.aggregate()["per_class"]["class_1"]["dice"] < 1.0
    assert m2.aggregate()["per_class"]["class_1"]["hd95"] > 0.0


@pytest.mark.parametrize("spacing", [None, (0.6, 1.7)])
def test_fov_hd95_on_restricted_masks(spacing) -> None:
    """HD95 with a FOV = medpy's hd95 of the masks with the outside set to background (the FOV
    edge cuts the masks and becomes part of their surfaces); Dice/IoU = set values inside."""
    rng = np.random.default_rng(3)
    shape = (48, 56)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    fov = (yy - 24) ** 2 / 20.0**2 + (xx - 28) ** 2 / 24.0**2 <= 1  # an elliptic US-like sector
    for _ in range(4):
        a, b = _blob(rng, shape), _blob(rng, shape)
        a[20:30, 40:56] = True  # both cut by the FOV edge on the right
        b[18:32, 44:56] = True
        m = SegmentationMetrics(2, spacing=spacing)
        m.update(_t(a)[None], _t(b)[None], fov=torch.from_numpy(fov)[None])
        r = m.aggregate()
        ar, br = a & fov, b & fov
        assert r["hd95"] == pytest.approx(medpy_hd95(ar, br, voxelspacing=spacing), rel=1e-9)
        assert r["hd95"] != pytest.approx(medpy_hd95(a, b, voxelspacing=spacing), rel=1e-6)
        assert r["dice"] == pytest.approx(2 * (ar & br).sum() / (ar.sum() + br.sum()), rel=1e-5)
        assert r["miou"] == pytest.approx((ar & br).sum() / (ar | br).sum(), rel=1e-5)


def test_invalid_inputs() -> None:
    m = SegmentationMetrics(3)
    with pytest.raises(ValueError):
        m.update(torch.full((1, 8, 8), 3), torch.zeros(1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError):
        m.update(torch.zeros(1, 8, 8, dtype=torch.long), torch.zeros(1, 8, 9, dtype=torch.long))
    with pytest.raises(ValueError):
        SegmentationMetrics(3, class_names=["a", "b"])


# ------------------------------------------------------------------ SAMed / TransUNet convention


def _samed_calculate_metric_percase(pred: np.ndarray, gt: np.ndarray):
    """SAMed's ``utils.calculate_metric_percase`` (hitachinsk/SAMed), line by line."""
    from medpy import metric

    pred = pred.astype(np.uint8)  # SAMed receives `prediction == i` and writes 1s into it
    gt = gt.astype(np.uint8)
    pred[pred > 0] = 1
    gt[gt > 0] = 1
    if pred.sum() > 0 and gt.sum() > 0:
        dice = metric.binary.dc(pred, gt)
        hd95 = metric.binary.hd95(pred, gt)
        return dice, hd95
    elif pred.sum() > 0 and gt.sum() == 0:
        return 1, 0
    else:
        return 0, 0


def _samed_inference(preds, targets, num_classes):
    """SAMed's ``test.py`` averaging: per-case lists summed / number of cases, then class mean."""
    metric_list = 0.0
    for p, t in zip(preds, targets):
        metric_i = [_samed_calculate_metric_percase(p == i, t == i) for i in range(1, num_classes)]
        metric_list += np.array(metric_i)
    metric_list = metric_list / len(preds)
    return metric_list, np.mean(metric_list, axis=0)[0], np.mean(metric_list, axis=0)[1]


def test_samed_convention_case_by_case() -> None:
    """The four empty/non-empty cases, image by image, against SAMed's own function."""
    from medpy.metric.binary import jc

    H, W = 24, 30
    blob_a = np.zeros((H, W), np.int64)
    blob_a[4:12, 5:15] = 1
    blob_b = np.zeros((H, W), np.int64)
    blob_b[6:16, 8:20] = 1
    empty = np.zeros((H, W), np.int64)
    cases = {  # (pred, gt)
        "both non-empty": (blob_a, blob_b),
        "pred only": (blob_a, empty),
        "gt only": (empty, blob_b),
        "both empty": (empty, empty),
    }
    expected = {"pred only": (1, 0), "gt only": (0, 0), "both empty": (0, 0)}
    m = SegmentationMetrics(2, convention="samed")
    m.update(_t(np.stack([p for p, _ in cases.values()])), _t(np.stack([g for _, g in cases.values()])))
    dice, hd, iou = m.values("dice")[:, 0], m.values("hd95")[:, 0], m.values("miou")[:, 0]
    for i, (name, (p, g)) in enumerate(cases.items()):
        ref_dice, ref_hd = _samed_calculate_metric_percase(p == 1, g == 1)
        assert dice[i] == pytest.approx(ref_dice, rel=1e-6), name
        assert hd[i] == pytest.approx(ref_hd, rel=1e-9, abs=1e-12), name
        if name in expected:
            assert (dice[i], hd[i]) == expected[name] and iou[i] == expected[name][0]
        else:
            assert iou[i] == pytest.approx(jc(p, g), rel=1e-6)
            assert 0 < dice[i] < 1 and hd[i] > 0
    # tskd's rule on the same images: gt-only and pred-only are errors, both-empty is skipped
    t = SegmentationMetrics(2)
    t.update(_t(np.stack([p for p, _ in cases.values()])), _t(np.stack([g for _, g in cases.values()])))
    diag = math.hypot(H - 1, W - 1)
    assert t.values("dice")[1:, 0].tolist()[:2] == [0.0, 0.0]
    assert t.values("hd95")[1:3, 0].tolist() == [diag, diag] and math.isnan(t.values("hd95")[3, 0])


def test_samed_convention_matches_samed_averaging() -> None:
    """Random multi-class maps with plenty of empty classes: per-class and mean Dice / HD95 equal
    SAMed's test.py computation (per class over all cases, then the mean over classes)."""
    rng = np.random.default_rng(5)
    C = 4
    targets = _random_label_maps(rng, 8, (36, 44), C)
    preds = _random_label_maps(rng, 8, (36, 44), C)
    preds[0] = targets[0].copy()
    targets[1][:] = 0  # an image with no foreground at all
    m = SegmentationMetrics(C, convention="samed")
    m.update(_t(np.stack(preds[:5])), _t(np.stack(targets[:5])))
    m.update(_t(np.stack(preds[5:])), _t(np.stack(targets[5:])))
    got = m.aggregate()
    per_class, mean_dice, mean_hd95 = _samed_inference(preds, targets, C)
    n_pred_only = sum(((p == c).any() and not (t == c).any()) for p, t in zip(preds, targets)
                      for c in range(1, C))
    n_gt_only = sum((not (p == c).any() and (t == c).any()) for p, t in zip(preds, targets)
                    for c in range(1, C))
    assert n_pred_only >= 2 and n_gt_only >= 2  # the conventions' differences are exercised
    assert got["dice"] == pytest.approx(mean_dice, rel=1e-6)
    assert got["hd95"] == pytest.approx(mean_hd95, rel=1e-9)
    for j in range(C - 1):
        assert got["per_class"][f"class_{j + 1}"]["dice"] == pytest.approx(per_class[j][0], rel=1e-6)
        assert got["per_class"][f"class_{j + 1}"]["hd95"] == pytest.approx(per_class[j][1], rel=1e-9)
    # and the tskd convention gives other numbers on the same data
    t = SegmentationMetrics(C)
    t.update(_t(np.stack(preds)), _t(np.stack(targets)))
    assert t.aggregate()["hd95"] != pytest.approx(got["hd95"], rel=1e-3)


@pytest.mark.parametrize("convention", ["tskd", "samed"])
def test_miou_background(convention) -> None:
    """mIoU over foreground classes only (default) or with the background class; Dice and HD95
    stay foreground-only either way."""
    t = np.zeros((2, 20, 20), np.int64)
    t[0, 5:15, 5:15] = 1
    t[1, 2:6, 2:6] = 2
    p = np.zeros_like(t)
    p[0, 5:15, 5:10] = 1
    p[1, 2:6, 2:4] = 2
    fg = SegmentationMetrics(3, convention=convention)
    fg.update(_t(p), _t(t))
    with_bg = SegmentationMetrics(3, convention=convention, miou_background=True)
    with_bg.update(_t(p), _t(t))
    a, b = fg.aggregate(), with_bg.aggregate()

    def iou(x, y):
        return (x & y).sum() / (x | y).sum()

    bg = np.mean([iou(p[i] == 0, t[i] == 0) for i in range(2)])
    c1 = iou(p[0] == 1, t[0] == 1)  # image 1: class 1 absent from both
    c2 = iou(p[1] == 2, t[1] == 2)
    if convention == "tskd":
        fg_means = [c1, c2]  # absent pairs are skipped
    else:
        fg_means = [c1 / 2, c2 / 2]  # absent pairs count 0
    assert a["miou"] == pytest.approx(np.mean(fg_means), rel=1e-5)
    assert b["miou"] == pytest.approx(np.mean([bg, *fg_means]), rel=1e-5)
    assert b["per_class"]["class_0"] == pytest.approx({"miou": bg}, rel=1e-5)
    assert "class_0" not in a["per_class"]
    assert (a["dice"], a["hd95"]) == (b["dice"], b["hd95"])


def test_convention_info_and_bad_convention() -> None:
    from tskd.metrics import convention_info

    info = convention_info("samed", miou_background=True, spacing=(0.5, 0.5))
    assert info["convention"] == "samed" and info["hd95_unit"] == "mm"
    assert info["miou_includes_background"] is True
    assert convention_info("tskd", miou_background=False, spacing=None)["hd95_unit"] == "pixels"
    with pytest.raises(ValueError, match="convention"):
        SegmentationMetrics(3, convention="nnunet")


def test_config_conventions_equal_metrics_conventions() -> None:
    from typing import get_args, get_type_hints

    from tskd.config import EvaluateConfig
    from tskd.metrics import CONVENTIONS

    assert get_args(get_type_hints(EvaluateConfig)["convention"]) == CONVENTIONS
    assert EvaluateConfig().convention == "tskd" and EvaluateConfig().miou_background is False
