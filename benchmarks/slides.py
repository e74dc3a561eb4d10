"""`leukodiff analyze --slides` as a user runs it: throughput with workers, memory with size.

The slides are folders of BCCD VOC-test fields, 100 fields a slide (fewer in a
quick run). The distinct fields are copied once into a temporary folder and
every further field is a hard link to a copy (slide folders may repeat a field;
a manifest would refuse the same file twice), so 10,000 fields cost no disk.
Each configuration is one `leukodiff analyze --slides ROOT --out OUT` process,
timed from start to exit (start-up, every report and thumbnail written
included); its output folder is deleted after. Memory: the resident set of the
whole process tree (the command and its worker processes), sampled from /proc
every 0.25 s, and the largest single process's peak (wait4's ru_maxrss).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.common import Skip, bench_fields

PER_SLIDE = 100


def slide_tree(root: Path, sources: list[Path], fields: int, per_slide: int) -> Path:
    """ROOT/slides/slide_NNNNN/field_NNNN.jpg: `fields` fields cycling `sources`."""
    copies = root / "sources"
    copies.mkdir(parents=True, exist_ok=True)
    local = []
    for number, source in enumerate(sources):
        target = copies / f"{number:03d}{source.suffix}"
        if not target.exists():
            shutil.copyfile(source, target)
        local.append(target)
    slides = root / f"slides-{fields}"
    for number in range(fields):
        folder = slides / f"slide_{number // per_slide:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / f"field_{number % per_slide:04d}.jpg"
        if not link.exists():
            os.link(local[number % len(local)], link)
    return slides


def _tree_rss_mb(root_pid: int) -> float:
    """Resident set of `root_pid` and all its descendants, in MiB (Linux /proc)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            parents[int(entry)] = int(stat[1])
            rss[int(entry)] = int(stat[21]) * page
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(rss.get(pid, 0) for pid in tree) / 2**20


def run_measured(command: list[str], env: dict[str, str], timeout: float) -> dict:
    """Run `command`: wall time, CPU time, peak tree RSS (sampled), largest process peak,
    exit code."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                peak[0] = max(peak[0], _tree_rss_mb(proc.pid))
            stop.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    errors: list[bytes] = []
    reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)
    reader.start()
    try:
        _, status, usage = _wait4(proc.pid, timeout)
    finally:
        stop.set()
        sampler.join()
    reader.join(5)
    wall = time.perf_counter() - start
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024
    return {"rc": os.waitstatus_to_exitcode(status), "wall_s": wall, "tree_peak_rss_mb": peak[0],
            "largest_process_peak_mb": usage.ru_maxrss / scale,
            "cpu_s": usage.ru_utime + usage.ru_stime,  # the command and its reaped workers
            "stderr_tail": (b"".join(errors).decode(errors="replace").strip()[-400:])}


def _wait4(pid: int, timeout: float):
    timer = threading.Timer(timeout, lambda: os.killpg(pid, 9))
    timer.start()
    try:
        return os.wait4(pid, 0)
    finally:
        timer.cancel()


def _leukodiff() -> list[str]:
    exe = Path(sys.executable).with_name("leukodiff")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "leukodiff.cli"]


def _analyze_command(root: Path, out: Path, extra: list[str]) -> list[str]:
    return [*_leukodiff(), "analyze", "--slides", str(root), "--out", str(out), "--backend", "onnx",
            *extra]


def _engine_available(engine: str) -> bool:
    """Whether this leukodiff's `analyze` has `--engine` (and names `engine` in its help)."""
    done = subprocess.run([*_leukodiff(), "analyze", "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, timeout=120)
    return "--engine" in done.stdout and engine in done.stdout


def _measure(root: Path, tmp: Path, name: str, extra: list[str], timeout: float) -> dict:
    out = tmp / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ)
    result = run_measured(_analyze_command(root, out, extra), env, timeout)
    summary = out / "summary.csv"
    result["slides_finished"] = (summary.read_text().count("\n") - 1 if summary.exists()
                                 else 0)
    result["command"] = "leukodiff analyze --slides ROOT --out OUT --backend onnx " + \
        " ".join(extra)
    shutil.rmtree(out, ignore_errors=True)
    if result["rc"] != 0:
        raise RuntimeError(f"`{result['command']}` exited {result['rc']}: "
                           f"{result['stderr_tail']}")
    return result


def _sources(spec: dict) -> list[Path]:
    return [f.image for f in bench_fields(spec.get("distinct", 1000), spec.get("data_root"))]


def workers(spec: dict) -> dict:
    """fields/s of --workers 1 and --workers 2 (one thread each) on the same slides; Ray too
    when this leukodiff has `--engine ray`."""
    tmp = Path(spec["tmp"]) / "slides"
    fields, per_slide = spec["fields"], spec.get("per_slide", PER_SLIDE)
    root = slide_tree(tmp, _sources(spec), fields, per_slide)
    configs = {"1 worker": ["--workers", "1", "--threads", "1"],
               "2 workers": ["--workers", "2", "--threads", "1"]}
    skipped = {}
    if _engine_available("ray"):
        configs["Ray, 2 workers (local)"] = ["--engine", "ray", "--workers", "2",
                                             "--threads", "1"]
    else:
        skipped["Ray"] = "this leukodiff's `analyze` has no --engine ray"
    rows = {}
    for label, extra in configs.items():
        result = _measure(root, tmp, label.replace(" ", "_").replace(",", ""), extra,
                          spec.get("timeout", 3600))
        result["fields_per_s"] = fields / result["wall_s"]
        rows[label] = result
    return {"fields": fields, "per_slide": per_slide, "configs": rows, "skipped": skipped}


def memory(spec: dict) -> dict:
    """Peak RSS of the same command on a small and a large set of slides (default workers)."""
    tmp = Path(spec["tmp"]) / "slides"
    per_slide = spec.get("per_slide", PER_SLIDE)
    sources = _sources(spec)
    if not sources:
        raise Skip("no BCCD fields")
    rows = {}
    for fields in spec["sizes"]:
        root = slide_tree(tmp, sources, fields, per_slide)
        result = _measure(root, tmp, f"memory-{fields}", [], spec.get("timeout", 3600))
        result["fields_per_s"] = fields / result["wall_s"]
        rows[str(fields)] = result
        shutil.rmtree(root, ignore_errors=True)
    return {"per_slide": per_slide, "workers": f"default (one per core: {os.cpu_count()})",
            "sizes": rows}
