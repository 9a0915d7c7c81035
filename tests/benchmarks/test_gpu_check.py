"""benchmarks/gpu_check.sh on CPU (``--device cpu --quick``): the GPU check's code paths with
gloo and fp32, without Ray (a stand-in ``ray`` package that refuses to import is first on the
path, as on a GPU machine that has none)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    no_ray = tmp_path / "no_ray" / "ray"
    no_ray.mkdir(parents=True)
    (no_ray / "__init__.py").write_text(
        "raise ImportError('ray is not installed on the GPU machine')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "DS_"))}
    env.update(PYTHON=sys.executable, OUT=str(tmp_path / "out"),
               GPU_CHECK_WHEELS=str(tmp_path / "no_wheels"), PYTHONPATH=str(no_ray.parent))
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=300)


def _field(text: str, name: str) -> str:
    match = re.search(rf"\b{name}=(\S+)", text)
    assert match, f"{name}= not printed in: {text}"
    return match.group(1).rstrip(";,")


def test_the_gpu_check_runs_its_code_paths_on_cpu(tmp_path):
    done = _run(tmp_path, "--device", "cpu", "--quick", "--threads", "1")
    out = done.stdout
    assert done.returncode == 0, out[-4000:]
    lines = {m.group(2): m.group(1) for m in re.finditer(r"^\[(PASS|FAIL)\] ([^:]+):", out, re.M)}
    assert lines == {"group": "PASS", "cache": "PASS", "distill replicated": "PASS",
                     "distill sharded": "PASS", "distill cached": "PASS",
                     "placements agree": "PASS", "timing": "PASS"}
    part = {name: next(line for line in out.splitlines() if line.startswith(f"[PASS] {name}:"))
            for name in lines}
    assert _field(part["group"], "backend") == "gloo"
    # the cached fp16 targets against the live fp32 teacher: within fp16's rounding
    for key in ("max_diff_logits", "max_diff_hidden"):
        assert 0 <= float(_field(part["cache"], key)) <= 2e-3 * 10  # |live| of sam_tiny < 10
    assert _field(part["cache"], "fp16") == "True"
    assert _field(part["cache"], "same_views") == "True"
    losses = {}
    for placement in ("replicated", "sharded", "cached"):
        line = part[f"distill {placement}"]
        assert _field(line, "engine") == "deepspeed" and _field(line, "zero") == "2"
        assert _field(line, "precision") == "fp32" and _field(line, "device") == "cpu"
        losses[placement] = [float(v) for v in _field(line, "losses").split(",")]
        assert len(losses[placement]) == 2
        assert all(math.isfinite(v) and v > 0 for v in losses[placement])
    # same seed, batches and flips; targets differ by fp16 rounding only
    assert losses["cached"] == pytest.approx(losses["replicated"], rel=1e-2)
    # the same fp32 teacher, gathered from its ZeRO-3 partition: the same targets
    assert losses["sharded"] == pytest.approx(losses["replicated"], rel=1e-5)
    assert "summary: SAM sam_tiny at 64 px / student at 64 px, batch 1, fp32:" in out
    assert re.search(r"^gpu_check: PASS \(7 parts passed, 0 failed\)", out, re.M)
    assert (tmp_path / "out" / "gpu_check.log").read_text() == out  # the tee'd log


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is present")
def test_the_gpu_check_fails_without_a_gpu(tmp_path):
    done = _run(tmp_path, "--skip-timing")  # --device cuda, the script's default
    assert done.returncode == 1
    assert "[FAIL] device: --device cuda but torch sees no CUDA device" in done.stdout
