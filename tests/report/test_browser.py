"""The report in a real browser: Debian's headless Chromium (installed by `.ci/run`), driven
over the DevTools protocol (headless.py). The page must load with no console error or warning
(script errors, failed loads), show its tables and decode every embedded plot; a screenshot of
the whole page is saved as a test artifact in tests/artifacts/ (git-ignored)."""

from __future__ import annotations

from pathlib import Path

import pytest

from headless import Browser, find_chromium

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"

pytestmark = pytest.mark.skipif(
    find_chromium() is None,
    reason="no headless Chromium: install Debian's package `chromium` (.ci/run does: "
           "apt-get install -y chromium)")


def test_the_check_sees_console_errors_and_broken_images(tmp_path):
    """The negative control: a page that logs an error and has a missing image is caught."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><body><script>console.error("boom")</script>'
                    '<img src="missing.png"></body></html>')
    with Browser() as browser:
        p = browser.open(page.as_uri())
        errors = p.console
        widths = p.evaluate("[...document.images].map(i => i.naturalWidth)")
    assert any("boom" in e for e in errors), errors
    assert any("missing.png" in e for e in errors), errors
    assert widths == [0]


def test_grid_report_renders_without_console_errors(grid_report):
    ARTIFACTS.mkdir(exist_ok=True)
    with Browser() as browser:
        p = browser.open(grid_report.as_uri())
        errors = p.console
        tables = p.evaluate("[...document.querySelectorAll('figure.table')].map(f => f.id)")
        rows = p.evaluate("document.querySelectorAll('#paper-labels-80 tbody tr').length")
        images = p.evaluate("[...document.images].map(i => [i.complete, i.naturalWidth, "
                            "i.getBoundingClientRect().width])")
        shot = p.screenshot(ARTIFACTS / "report.png")
    assert errors == []
    assert {"paper-labels-20", "paper-labels-40", "paper-labels-80", "compute", "memory",
            "seed-tests", "transfer-quality", "failures"} <= set(tables)
    assert rows >= 6  # teacher, scratch, 2 x TA-KD, 2 x TS-KD, reference
    assert len(images) == 6 and all(c and w > 100 and shown > 100 for c, w, shown in images)
    assert shot.stat().st_size > 50_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
