"""`tskd report`: the HTML holds the numbers of results.json and the manifests, computed here
independently (statistics, scipy) from the files the fake runs wrote."""

from __future__ import annotations

import json
import math
import statistics
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from fake_runs import STUDENT_CFG


class Tables(HTMLParser):
    """``tables[id] = [[cell text, ...], ...]`` (body rows, ``<td>`` only) and ``attrs[id]``
    (the cells' attributes), the ``<img>`` sources and the headings."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.attrs: dict[str, list[list[dict[str, str]]]] = {}
        self.images: list[str] = []
        self._fig: str | None = None
        self._cell: dict[str, str] | None = None
        self._text = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure" and "table" in a.get("class", ""):
            self._fig = a["id"]
            self.tables[self._fig], self.attrs[self._fig] = [], []
        elif tag == "tr" and self._fig:
            self.tables[self._fig].append([])
            self.attrs[self._fig].append([])
        elif tag == "td" and self._fig:
            self._cell, self._text = a, ""
        elif tag == "img":
            self.images.append(a.get("src", ""))

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.tables[self._fig][-1].append(self._text.strip())
            self.attrs[self._fig][-1].append(self._cell)
            self._cell = None
        elif tag == "figure":
            self._fig = None

    def handle_data(self, data):
        if self._cell is not None:
            self._text += data


def parse(path: Path) -> Tables:
    p = Tables()
    p.feed(path.read_text())
    for t in p.tables.values():  # drop the header rows (no <td>)
        t[:] = [r for r in t if r]
    for a in p.attrs.values():
        a[:] = [r for r in a if r]
    return p


def by_method(p: Tables, table: str) -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = {}
    for cells, attrs in zip(p.tables[table], p.attrs[table]):
        out.setdefault(attrs[0].get("data-method", cells[0]), []).append(cells)
    return out


def load(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def manifest(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "manifest.json").read_text())


def test_single_run_tables_hold_results_json(single_run, single_report):
    res = load(single_run)
    p = parse(single_report)
    rows = by_method(p, "paper-labels-40")
    models = {"teacher": res["teacher"], "reference": res["reference"], **res["students"]}
    assert set(rows) == set(models)
    for method, scores in models.items():
        (cells,) = rows[method]
        want = ([f"{scores['per_class'][c]['dice']:.4f}" for c in ("organ", "lesion")]
                + [f"{scores['dice']:.4f}"]
                + [f"{scores['per_class'][c]['hd95']:.2f}" for c in ("organ", "lesion")]
                + [f"{scores['hd95']:.2f}", f"{scores['miou']:.4f}"])
        assert cells[3:] == want, method
    # transfer-set size only for the methods that distil on it
    assert rows["ts_kd"][0][1] == "300" and rows["scratch"][0][1] == "–"
    best = max(res["students"], key=lambda a: res["students"][a]["dice"])
    bold = [a for a in p.attrs["paper-labels-40"] for c in a if "best" in c.get("class", "")]
    assert len(bold) == 1 and bold[0][0]["data-method"] == best


def test_single_run_compute_memory_and_transfer_tables(single_run, single_report):
    res = load(single_run)
    p = parse(single_report)
    compute = by_method(p, "compute")
    scratch = res["students"]["scratch"]["dice"]
    for arm in ("ts_kd", "ta_kd"):
        (cells,) = compute[arm]
        gain = (res["students"][arm]["dice"] - scratch) / scratch * 100
        assert cells[3] == f"{manifest(single_run, f'distill_{arm}')['wall_time_s']:.1f}"
        assert cells[4] == f"{manifest(single_run, f'student_{arm}')['wall_time_s']:.1f}"
        assert cells[6] == f"{gain:.1f}"
    assert compute["scratch"][0][3] == "–" and compute["scratch"][0][6] == "–"
    mem = {r[0]: r for r in p.tables["memory"]}
    adapter = manifest(single_run, "teacher")["metrics"]["teacher/adapter_mb"]
    assert mem["Teacher (LoRA SAM)"][5] == f"{adapter:.3f}"
    assert mem["Scratch"][4] == f"{res['students']['scratch']['model']['size_mb']:.3f}"
    ref = mem["Reference (labels only)"]
    assert ref[1] == "basic_unet" and ref[3] == f"{res['reference']['model']['params']:,}"
    quality = json.loads((single_run / "transfer" / "quality.json").read_text())
    (row,) = p.tables["transfer-quality"]
    assert row[1:4] == ["40", "0", "300"]  # labels, seed, configured size
    assert row[8] == f"{quality['kept']['psnr']['mean']:.2f}"
    assert row[5] == str(quality["n_sampled"]) and row[6] == "300"  # kept: transfer/n_images
    shared = {r[0]: r[3] for r in p.tables["shared-stages"]}
    assert shared["teacher"] == f"{manifest(single_run, 'teacher')['wall_time_s']:.1f}"
    # the DDPM is shared too (it is upstream of distillation, yet not a student's pre-training:
    # the compute table's KD times above are distillation's alone)
    assert shared["ddpm"] == f"{manifest(single_run, 'ddpm')['wall_time_s']:.1f}"
    assert [r[0] for r in p.tables["shared-stages"]] == ["data", "teacher", "ddpm", "transfer"]
    # one seed: no paired tests; overlays, transfer samples and the Dice plot are embedded
    assert "seed-tests" not in p.tables and "failures" not in p.tables
    pngs = [s for s in p.images if s.startswith("data:image/png;base64,")]
    assert len(pngs) == len(p.images) == 3  # Dice per method, overlays, transfer samples
    assert "http" not in single_report.read_text().split("<body>")[1]  # self-contained


def test_grid_means_stds_and_paired_tests(grid_root, grid_report):
    p = parse(grid_report)
    runs = {f"l{n}_t{t}_s{s}": load(grid_root / f"l{n}_t{t}_s{s}")
            for n in (40, 80) for t in (100, 200) for s in range(3)}
    rows = by_method(p, "paper-labels-80")
    for arm, size in (("ts_kd", "200"), ("ta_kd", "100"), ("scratch", "–")):
        key = "" if size == "–" else f"_t{size}"
        vals = [r["students"][arm]["dice"] for n, r in runs.items()
                if n.startswith(f"l80{key or '_t100'}")]
        (cells,) = [c for c in rows[arm] if c[1] == size]
        assert cells[2] == "3"
        assert cells[5] == f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}"
    # paired t-test and Wilcoxon of TS-KD vs scratch at 40 labels, 100 images, by seed
    ts = [runs[f"l40_t100_s{s}"]["students"]["ts_kd"]["dice"] for s in range(3)]
    sc = [runs[f"l40_t100_s{s}"]["students"]["scratch"]["dice"] for s in range(3)]
    tests = [c for c, a in zip(p.tables["seed-tests"], p.attrs["seed-tests"])
             if a[0]["data-method"] == "ts_kd" and c[1] == "100" and c[2] == "40"
             and c[3] == "Scratch"]
    (cells,) = tests
    assert cells[4] == "3"
    assert cells[5] == f"{np.mean(np.subtract(ts, sc)):.4f}"
    assert cells[6] == f"{stats.ttest_rel(ts, sc).pvalue:.4f}"
    assert cells[7] == f"{stats.wilcoxon(ts, sc).pvalue:.4f}"
    # shared entries counted once: scratch at 80 labels has 3 seeds, not 6 (two sizes)
    assert len(rows["scratch"]) == 1
    # one DDPM per (label budget, seed), whatever the transfer-set size: 40 and 80 labels x
    # seeds 0-2, and 20 labels at seed 3; one transfer set per (budget, size, seed)
    shared = [r[0] for r in p.tables["shared-stages"]]
    assert shared.count("ddpm") == 7 and shared.count("transfer") == 13


def test_grid_plots_failed_cell_and_missing_reference(grid_root, grid_report):
    p = parse(grid_report)
    # scores, Dice vs labels, Dice vs transfer size, overlays, transfer samples (one set per
    # size: 100 and 200 images)
    assert len(p.images) == 6
    assert len(p.tables["transfer-quality"]) == 13  # 2 budgets x 2 sizes x 3 seeds + 1
    failed = [c for c in p.tables["paper-labels-40"] if c[1] == "300"]
    assert {c[0] for c in failed} == {"TS-KD", "Task-agnostic KD"}
    assert all("failed (l40_t300_s0)" in c[3] and "near-copy" in c[3] for c in failed)
    (fail,) = p.tables["failures"]
    assert fail[:2] == ["l40_t300_s0", "transfer"] and "TransferSetError" in fail[2]
    # a run that has neither finished nor failed is listed, but contributes no row
    assert not any(c[1] == "400" for t in p.tables.values() for c in t if len(c) > 1)
    assert "incomplete" in grid_report.read_text()
    # the 20-label cell ran without the reference: the row is still there, saying so
    ref = by_method(p, "paper-labels-20")["reference"]
    assert ref[0][3].startswith("not run")


def test_overlays_match_an_independent_prediction(single_run, tiny_models, fake_dataset):
    """predict_overlays tints exactly the pixels where Student.forward's own argmax (which
    resizes internally) is foreground."""
    from tskd.data.format import load_dataset_info, read_case
    from tskd.models.students import build_student
    from tskd.predict import PALETTE
    from tskd.report.images import predict_overlays

    info = load_dataset_info(fake_dataset)
    image = read_case(info, info.case_ids[0])[0]
    model = build_student(STUDENT_CFG, 3)
    model.load_state_dict(torch.load(tiny_models["ts_kd"], weights_only=True))
    model.eval()
    (overlay,) = predict_overlays(model, [image])
    with torch.no_grad():
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        labels = model(x).logits.argmax(1)[0].numpy()
    assert labels.max() > 0  # the sharpened head predicts some foreground
    expect = np.where((labels > 0)[..., None],
                      np.round(0.5 * image + 0.5 * PALETTE[labels].astype(np.float32)), image)
    agree = np.all(overlay == expect.astype(np.uint8), axis=-1).mean()
    assert agree > 0.99


def test_overlays_of_a_patch_trained_student_use_sliding_windows(tiny_models, fake_dataset):
    """A student trained on 16-px patches of 32-px images is drawn as `tskd predict` runs it:
    MONAI's sliding windows (16 px, overlap 0.25, Gaussian) over the image, each window through
    Student.forward, not one forward on the whole image squeezed into the model's input."""
    from monai.inferers import sliding_window_inference

    from tskd.data.format import load_dataset_info, read_case
    from tskd.models.students import build_student
    from tskd.predict import PALETTE
    from tskd.report.images import predict_overlays

    info = load_dataset_info(fake_dataset)
    image = read_case(info, info.case_ids[1])[0]
    cfg = dict(STUDENT_CFG, img_size=16, patch_size=8)
    torch.manual_seed(3)
    model = build_student(cfg, 3).eval()
    with torch.no_grad():
        model.decoder.head[-1].weight.mul_(20)
    (windowed,) = predict_overlays(model, [image], working_size=32, window=16)
    (whole,) = predict_overlays(model, [image])
    with torch.no_grad():
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float()  # already 32 px
        logits = sliding_window_inference(x, roi_size=(16, 16), sw_batch_size=4, overlap=0.25,
                                          mode="gaussian", predictor=lambda t: model(t).logits)
    labels = logits.argmax(1)[0].numpy()
    assert len(np.unique(labels)) > 1
    expect = np.where((labels > 0)[..., None],
                      np.round(0.5 * image + 0.5 * PALETTE[labels].astype(np.float32)), image)
    assert np.all(windowed == expect.astype(np.uint8), axis=-1).mean() > 0.99
    assert np.any(windowed != whole)  # the whole-image path draws something else


def test_patch_meta_reads_the_stage_config(tmp_path):
    """Windows only where the stage's resolved data config trained on patches; fake / older
    manifests without `config` give whole images."""
    from tskd.predict import patch_meta

    def meta(manifest):
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        return patch_meta(tmp_path / "manifest.json")

    assert meta({"config": {"data": {"image_size": 1024, "patch_size": 256}}}) == {
        "working_size": 1024, "window": 256}
    assert meta({"config": {"data": {"image_size": 128, "patch_size": "auto"}}}) == {}
    assert meta({"config": {"data": {"image_size": "auto"}}}) == {}
    assert meta({"stage_config": {"student": STUDENT_CFG}}) == {}


def test_cli_report_and_errors(single_run, tmp_path, capsys):
    from tskd.cli import main

    out = tmp_path / "r.html"
    assert main(["report", str(single_run), "--output", str(out), "--images", "0",
                 "--transfer-samples", "0"]) == 0
    assert f"report: {out}" in capsys.readouterr().out
    assert out.is_file() and "No overlays" in out.read_text()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert main(["report", str(single_run), "--images", "-1"]) == 2
    assert "--images" in capsys.readouterr().err



def test_report_is_core_code_without_ray():
    """No module of tskd.report imports Ray, DeepSpeed or the stage/CLI layers (lazy imports
    inside functions included)."""
    import ast

    import tskd.report

    banned = ("ray", "deepspeed", "tskd.stages", "tskd.pipeline", "tskd.cli", "tskd.store",
              "tskd.artifacts")
    pkg = Path(tskd.report.__file__).parent
    for path in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not any(name == b or name.startswith(b + ".") for b in banned), \
                    f"{path.name} imports {name}"


def test_tskd_run_ends_with_the_report_command(single_run, tmp_path, capsys, monkeypatch):
    """`tskd run` prints the command that writes its report (Ray and the pipeline stubbed:
    the stub leaves the fake run's results.json where the run's would be)."""
    import shutil

    import ray

    import tskd.pipeline
    from tskd.cli import main

    def fake_pipeline(cfg, **kwargs):
        cfg.run_dir.mkdir(parents=True)
        shutil.copy(single_run / "results.json", cfg.run_dir / "results.json")

    monkeypatch.setattr(ray, "init", lambda *a, **k: None)
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: None)
    monkeypatch.setattr(tskd.pipeline, "run_pipeline", fake_pipeline)
    assert main(["run", "--set", f"output_dir={tmp_path / 'runs'}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"report:  tskd report {(tmp_path / 'runs' / 'demo').resolve()}"


def test_transfer_samples_are_the_lowest_ids_as_written(single_run):
    """The reader returns the lowest-id images exactly as the fake transfer stage wrote them
    (regenerated here from its seed), with their nearest-reference fields."""
    from fake_runs import IMAGE_SIZE

    from tskd.report.images import read_transfer_samples

    samples = read_transfer_samples(single_run / "transfer", 3)
    written = np.random.default_rng(300).integers(0, 256, (4, IMAGE_SIZE, IMAGE_SIZE, 3),
                                                 dtype=np.uint8)
    assert [s["id"] for s in samples] == [0, 1, 2]
    for s, img in zip(samples, written):
        assert s["image"].dtype == np.uint8 and np.array_equal(s["image"], img)
    assert [s["nn_kind"] for s in samples] == ["train", "hflip", "augmented"]
    assert [s["nn_psnr"] for s in samples] == [18.5, 19.0, 19.7]


def test_find_runs_takes_runs_not_the_store(tmp_path):
    from tskd.report import find_runs

    for run in ("demo", "grid/cell_a", "grid/cell_b", ".pre-store/old"):
        (tmp_path / run).mkdir(parents=True)
        (tmp_path / run / "results.json").write_text("{}")
    (tmp_path / "grid" / "cell_c").mkdir()
    (tmp_path / "grid" / "cell_c" / "teacher.error.log").write_text("boom\n")
    (tmp_path / "store" / "evaluate" / "fp").mkdir(parents=True)  # entries hold results.json
    (tmp_path / "store" / "evaluate" / "fp" / "results.json").write_text("{}")
    (tmp_path / "notes").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "demo")
    found = [p.relative_to(tmp_path).as_posix() for p in find_runs(tmp_path)]
    assert found == ["demo", "grid/cell_a", "grid/cell_b", "grid/cell_c", "linked"]
    assert find_runs(tmp_path / "demo") == [tmp_path / "demo"]
    with pytest.raises(FileNotFoundError, match="no run found"):
        find_runs(tmp_path / "notes")


def test_a_tskd_grid_directory_reports_its_cells(tmp_path, fake_dataset):
    """`tskd report runs/<name>-grid`: the cells are the run directories <name>-<cell> beside
    it (named by grid.csv and errors/); a cell that failed with only errors/<cell>.txt is
    failed; other runs under the same output directory are left out."""
    from fake_runs import FakeGrid

    from tskd.report import build_report, find_runs
    from tskd.report.collect import read_runs

    runs = tmp_path / "runs"
    fake = FakeGrid(runs, fake_dataset)
    fake.run("demo", labels=40, size=100, seed=0)  # not a cell of the grid
    fake.run("cmp-ts_kd-n100-l40-s0", labels=40, size=100, seed=0)
    fake.run("cmp-ts_kd-n200-l40-s0", labels=40, size=200, seed=0, stop_at="transfer")
    grid = runs / "cmp-grid"
    (grid / "errors").mkdir(parents=True)
    (grid / "grid.yaml").write_text("name: cmp\naxes: {methods: [ts_kd]}\nbase: {}\n")
    (grid / "grid.csv").write_text("cell,status\nts_kd-n100-l40-s0,done\n"
                                   "ts_kd-n200-l40-s0,failed\n")
    (grid / "errors" / "ts_kd-n200-l40-s0.txt").write_text(
        "Traceback (most recent call last):\nRuntimeError: out of memory in the sampler\n")
    assert [p.name for p in find_runs(grid)] == ["cmp-ts_kd-n100-l40-s0", "cmp-ts_kd-n200-l40-s0"]
    failed = {r.name: r for r in read_runs(grid)}["cmp-ts_kd-n200-l40-s0"]
    assert [(f.stage, f.message) for f in failed.failures] == [
        ("cell", "RuntimeError: out of memory in the sampler")]
    report = build_report(grid, n_images=0, n_transfer=0)
    rows = report["paper_tables"][0].body
    ts = [[c.text for c in r] for r in rows if r[0].attrs.get("data-method") == "ts_kd"]
    assert [r[1] for r in ts] == ["100", "200"]
    assert ts[1][3] == "failed (cmp-ts_kd-n200-l40-s0): cell: RuntimeError: out of memory " \
                       "in the sampler"


def test_single_run_deploy_table_ranks_students_and_marks_the_pareto_front(single_run,
                                                                            single_report):
    res = load(single_run)
    p = parse(single_report)
    models = {arm: s for arm, s in res["students"].items()} | {"reference": res["reference"]}
    rows = p.tables["deploy"]
    methods = [a[1]["data-method"] for a in p.attrs["deploy"]]
    assert sorted(methods) == sorted(models)
    dice = [float(a[3]["data-value"]) for a in p.attrs["deploy"]]
    assert dice == sorted(dice, reverse=True)  # best first
    ref = res["reference"]["dice"]
    for method, cells, attrs in zip(methods, rows, p.attrs["deploy"]):
        m = models[method]
        assert cells[0] == "40" and cells[3] == f"{m['dice']:.4f}"
        assert cells[4] == f"{m['model']['latency_ms']:.1f}"
        assert cells[5] == f"{m['model']['size_mb']:.3f}"
        # on the front unless another model is as good in Dice, latency and size, better in one
        others = [o for k, o in models.items() if k != method]
        dominated = any(o["dice"] >= m["dice"]
                        and o["model"]["latency_ms"] <= m["model"]["latency_ms"]
                        and o["model"]["size_mb"] <= m["model"]["size_mb"]
                        and (o["dice"], o["model"]["latency_ms"], o["model"]["size_mb"])
                        != (m["dice"], m["model"]["latency_ms"], m["model"]["size_mb"])
                        for o in others)
        assert cells[6] == ("" if dominated else "yes"), method
        assert cells[7] == ("–" if method == "reference" else f"{m['dice'] - ref:+.4f}")


def test_pareto_front_of_dice_latency_and_size():
    from tskd.report.tables import pareto_front

    points = [(0.80, 10.0, 5.0),   # best Dice: on the front
              (0.70, 2.0, 1.0),    # fastest and smallest: on the front
              (0.70, 3.0, 1.0),    # dominated by the second
              (0.75, 2.0, 9.0),    # better Dice than the second, bigger: on the front
              (float("nan"), 1.0, 1.0)]  # no score: never on it, dominates nothing
    assert pareto_front(points) == [True, True, False, True, False]
