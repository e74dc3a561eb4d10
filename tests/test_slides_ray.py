"""`analyze --slides --engine ray` (issue #17): the slide job on a local Ray instance writes
what the local engine writes (real BCCD fields, the shipped models); an unreachable
cluster and a cluster that dies mid-run get a clear message, finished slides kept."""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_slides import CtrlC, analyze, comparable, flat, summary

from leukodiff.reports.slides import (
    AnalyzerSpec,
    SlidesInterrupted,
    analyze_slides,
    slides_from_folders,
)

ray = pytest.importorskip("ray", reason="the `ray` extra is not installed")

BCCD = ("bccd", "BCCD", "JPEGImages")
FIELDS = {"A": ["BloodImage_00002.jpg", "BloodImage_00000.jpg", "BloodImage_00001.jpg"],
          "B": ["BloodImage_00010.jpg", "BloodImage_00011.jpg"]}


def make_slides(root: Path, shared_data: Path, fields: dict[str, list[str]]) -> Path:
    for slide, names in fields.items():
        (root / slide).mkdir(parents=True)
        for name in names:
            shutil.copy(shared_data.joinpath(*BCCD, name), root / slide)
    return root


@pytest.fixture(scope="module")
def slides_dir(shared_data, tmp_path_factory) -> Path:
    return make_slides(tmp_path_factory.mktemp("ray") / "in", shared_data, FIELDS)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance of 2 CPUs for the module (the engine uses it as it finds it)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def run_both(slides_dir: Path, root: Path, *extra: str) -> tuple[Path, Path, str]:
    """The same job on the local engine (one worker) and on Ray (2 actors)."""
    local, on_ray = root / "local", root / "ray"
    result = analyze(str(slides_dir), "--slides", "--out", str(local), "--workers", "1",
                     *extra)
    assert result.exit_code == 0, result.output
    result = analyze(str(slides_dir), "--slides", "--out", str(on_ray), "--workers", "2",
                     "--engine", "ray", *extra)
    assert result.exit_code == 0, result.output
    return local, on_ray, flat(result)


def test_ray_writes_what_the_local_engine_writes(local_ray, slides_dir, tmp_path):
    local, on_ray, output = run_both(slides_dir, tmp_path)
    assert "2 worker(s) on Ray" in output and "Run summary: 2 slide(s)" in output
    assert comparable(on_ray) == comparable(local)  # every file, every number
    rows, expected = summary(on_ray), summary(local)
    for row in (*rows.values(), *expected.values()):
        del row["seconds"]
    assert rows == expected and rows["A"]["status"] == "done"
    assert len(list((on_ray / "slides" / "A" / "cells").glob("*.jpg"))) == int(
        rows["A"]["white_cells"]) > 0


def test_ray_stops_a_slide_at_its_target_as_the_local_engine_does(local_ray, slides_dir,
                                                                    tmp_path):
    local, on_ray, _ = run_both(slides_dir, tmp_path, "--target", "2")
    assert summary(on_ray)["A"]["status"] == "target reached"
    assert sorted(p.name for p in (on_ray / "slides" / "A" / "fields").glob("*.png")) == [
        "0001_BloodImage_00000.png", "0002_BloodImage_00001.png"]  # the third dropped
    assert comparable(on_ray) == comparable(local)


def test_ctrl_c_on_ray_keeps_finished_slides_and_resume_on_ray_finishes(local_ray, slides_dir,
                                                                        tmp_path):
    slides, _ = slides_from_folders([slides_dir])
    out = tmp_path / "out"
    with pytest.raises(SlidesInterrupted) as interrupted:
        analyze_slides(slides, out, AnalyzerSpec(), workers=2, engine="ray", progress=CtrlC())
    statuses = {row["slide"]: row["status"] for row in interrupted.value.run.rows}
    assert statuses == {"A": "done", "B": "interrupted"}
    assert not (out / "slides" / "B" / "differential.json").exists()
    kept = (out / "slides" / "A" / "differential.json").stat().st_mtime_ns
    run = analyze_slides(slides, out, AnalyzerSpec(), workers=2, engine="ray", resume=True)
    assert [row["status"] for row in run.rows] == ["done", "done"]
    assert "finished by an earlier run" in run.rows[0]["note"]
    assert (out / "slides" / "A" / "differential.json").stat().st_mtime_ns == kept


def test_an_unreachable_cluster_is_named_and_nothing_is_written(slides_dir, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "out"
    result = analyze(str(slides_dir), "--slides", "--out", str(out), "--engine", "ray",
                     "--address", f"127.0.0.1:{port}")
    assert result.exit_code == 1
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in flat(result)
    assert "Nothing was analysed" in flat(result) and not out.exists()
    result = analyze(str(slides_dir), "--slides", "--out", str(out), "--engine", "ray",
                     "--address", "headnode")
    assert result.exit_code == 1 and "HOST:PORT" in flat(result)
    result = analyze(str(slides_dir), "--slides", "--out", str(out), "--address", "h:6379")
    assert result.exit_code == 1 and "add --engine ray" in flat(result)
    result = analyze(str(slides_dir), "--slides", "--out", str(out), "--engine", "spark")
    assert result.exit_code == 1 and "local, ray" in flat(result)
    assert not out.exists()


def descendants(pid: int) -> dict[int, str]:
    """The processes under `pid` (Ray's head: gcs_server, raylet, its agents and workers),
    with their commands."""
    parents, commands = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            commands[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().decode(
                errors="replace")
        except (OSError, IndexError, ValueError):
            continue
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child in [c for c, p in parents.items() if p == parent]:
            found[child] = commands[child]
            todo.append(child)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds Ray's head through /proc")
def test_a_cluster_that_dies_mid_run_keeps_finished_slides_and_resume_goes_on(
        shared_data, tmp_path):
    """The head of the run's local Ray (its GCS and raylet) killed once slide A is done:
    the run says so and exits 1, A is kept, B is left for --resume (~30 s: Ray's start,
    and the watch's 6 s of silence)."""
    slides_dir = make_slides(tmp_path / "in", shared_data, {
        "A": ["BloodImage_00000.jpg"],
        "B": [f"BloodImage_000{n}.jpg" for n in range(10, 18)]})
    out = tmp_path / "out"
    env = {**os.environ, "RAY_gcs_rpc_server_reconnect_timeout_s": "16",  # the watch: 6 s
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    run = subprocess.Popen([sys.executable, "-m", "leukodiff.cli", "analyze", str(slides_dir),
                            "--slides", "--out", str(out), "--engine", "ray", "--workers",
                            "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    ours: dict[int, str] = {}
    try:
        while not (out / "slides" / "A" / "differential.json").exists():
            assert run.poll() is None, run.communicate()[0]
            time.sleep(0.1)
        ours = descendants(run.pid)
        head = [pid for pid, cmd in ours.items() if "gcs_server" in cmd or "raylet" in cmd]
        assert len(head) == 2, ours
        for pid in head:
            os.kill(pid, signal.SIGKILL)
        output, _ = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
        for pid in ours:  # what the dead head leaves behind (its agents)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    text = " ".join(output.split())
    assert run.returncode == 1, output
    assert "the Ray cluster failed during the run" in text and "rerun with --resume" in text
    with (out / "summary.csv").open() as handle:
        rows = {row["slide"]: row for row in csv.DictReader(handle)}
    assert rows["A"]["status"] == "done"  # B: "interrupted", or "not started" when no
    assert rows["B"]["status"] in ("interrupted", "not started")  # field of it came back
    kept = (out / "slides" / "A" / "differential.json").stat().st_mtime_ns
    assert not (out / "slides" / "B" / "differential.json").exists()
    result = analyze(str(slides_dir), "--slides", "--out", str(out), "--workers", "1",
                     "--resume")
    assert result.exit_code == 0, result.output
    rows = summary(out)
    assert rows["B"]["status"] == "done" and rows["B"]["fields_analysed"] == "8"
    assert "finished by an earlier run" in rows["A"]["note"]
    assert (out / "slides" / "A" / "differential.json").stat().st_mtime_ns == kept
