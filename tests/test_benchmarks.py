"""The benchmark suite runs: quick mode end to end, and a report of nothing measured.

No timing is asserted (CI machines are shared and slow); what is checked is
that every section produces rows, that nothing crashes (a missing backend or
ultralytics is a "skipped" row, never a failure) and that the page is written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUICK_SECTIONS = {"latency", "level2", "coldstart", "scaling", "profile"}


@pytest.mark.slow
def test_quick_run_writes_page_figure_and_rows(tmp_path: Path, shared_data: Path) -> None:
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out),
                           "--data-root", str(shared_data)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    page = (out / "BENCHMARKS.md").read_text()
    assert (out / "figures" / "benchmarks.png").stat().st_size > 0
    rows = json.loads((out / "figures" / "benchmarks.json").read_text())["rows"]
    assert {row["section"] for row in rows} == QUICK_SECTIONS
    assert not [row for row in rows if row["status"] == "failed"], done.stdout
    by_name = {row["name"]: row for row in rows}
    assert {"leukodiff onnx", "leukodiff torch", "fasterrcnn_mobilenet_v3_large_320_fpn",
            "fasterrcnn_mobilenet_v3_large_fpn", "yolov8n"} <= set(by_name)
    torch_row = by_name["leukodiff torch"]
    assert torch_row["status"] == "ok"
    assert torch_row["metrics"]["runs"] == 3 and torch_row["peak_rss_mb"] > 0
    assert by_name["fasterrcnn_mobilenet_v3_large_320_fpn"]["status"] == "ok"
    assert all(not row.get("network_attempts") for row in rows)
    for heading in ("## Targets", "## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 6.",
                    "Quick run", "leukodiff torch"):
        assert heading in page


def test_report_of_a_run_where_everything_was_skipped(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import report, run

    args = run.parse_args(["--quick"])
    rows = [{"section": job.section, "name": job.name, "status": "skipped",
             "reason": "not here"} for job in run.plan(args)]
    meta = report.machine(args, None, None, 1.0, ["BloodImage_00001.jpg"])
    paths = report.write(rows, meta, tmp_path)
    assert all(path.exists() for path in paths)
    page = (tmp_path / "BENCHMARKS.md").read_text()
    assert "skipped: not here" in page and "**met**" not in page


def test_summary_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.common import summarize

    stats = summarize([float(v) for v in range(1, 11)])
    assert stats["runs"] == 10 and stats["median_ms"] == 5.5
    assert stats["p90_ms"] == pytest.approx(9.1)
    assert summarize([]) == {"runs": 0}
