"""Run the whole benchmark suite and write docs/BENCHMARKS.md (+ figures, raw JSON).

    python -m benchmarks.run                 # full run: ~30 min on 2 idle cores
    python -m benchmarks.run --quick         # smoke test: 3 fields, 3 runs, small sizes
    python -m benchmarks.run --only latency,level2 --out /tmp/bench

The parent only schedules: every system runs in its own subprocess
(`benchmarks.child`) with the same thread count, and reports one JSON line.
A system that cannot run here (no onnxruntime files, ultralytics not
installed) becomes a "skipped" row with its reason; one that crashes becomes
a "failed" row; neither stops the run. Run it on an idle machine: the report
records the load average before and after, and timings with other work
running are not comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, RESULT_MARK, set_thread_env

SECTIONS = ("latency", "onnx", "level2", "coldstart", "scaling", "slides", "wholeslide",
            "profile", "training")
PEERS = ("fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn")
#: Sizes of the issue-17 scaling figures, full run and (quick) smoke test.
# The quick sizes only show that every step runs (two slides; a run ten times larger):
# tests/test_benchmarks.py runs them, and each quick field costs about a second under load.
SLIDES_FIELDS = {False: 1000, True: 8}  # --workers 1 vs 2
SLIDES_PER_SLIDE = {False: 100, True: 4}
MEMORY_SIZES = {False: [500, 10_000], True: [4, 40]}  # peak RSS, small vs large run
WSI_SIDE_GRID = {False: (50_000, 16), True: (6_000, 3)}  # slide side (px), grid of fields


@dataclass
class Job:
    """One subprocess to run: what it measures, its spec, a rough duration for the estimate."""

    section: str
    name: str
    spec: dict[str, Any] = field(default_factory=dict)
    estimate_s: float = 10.0
    command: list[str] | None = None  # a plain command (cold start) instead of a child spec
    timeout_s: float | None = None  # longer than --timeout for the long scaling runs


@dataclass
class Finished:
    rc: int
    wall_s: float
    stdout: str
    stderr: str
    peak_rss_mb: float
    cpu_s: float
    timed_out: bool


def run_process(command: list[str], env: dict[str, str], timeout: float) -> Finished:
    """Run `command`, with its own rusage (peak RSS, CPU) from wait4; killed at `timeout`."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, start_new_session=True)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the child and its workers

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        scale = 1024 * 1024 if sys.platform == "darwin" else 1024
        return Finished(proc.returncode, wall, out.read().decode(errors="replace"),
                        err.read().decode(errors="replace"), usage.ru_maxrss / scale,
                        usage.ru_utime + usage.ru_stime, timed_out.is_set())


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def run_child(job: Job, env: dict[str, str], timeout: float) -> dict:
    """A measuring child: its JSON result, or a failed row with the reason."""
    done = run_process([sys.executable, "-m", "benchmarks.child", json.dumps(job.spec)],
                       env, timeout)
    row: dict[str, Any] = {"section": job.section, "name": job.name, "spec": job.spec,
                           "wall_s": done.wall_s, "process_cpu_s": done.cpu_s}
    results = [line[len(RESULT_MARK):] for line in done.stdout.splitlines()
               if line.startswith(RESULT_MARK)]
    if results:
        row.update(json.loads(results[-1]))
        if row["status"] == "failed":
            row["log"] = _last_line(done.stderr)
    else:
        reason = (f"timed out after {timeout:.0f} s" if done.timed_out
                  else f"exit {done.rc}: {_last_line(done.stderr) or _last_line(done.stdout)}")
        row.update(status="failed", reason=reason, peak_rss_mb=done.peak_rss_mb)
    return row


def cold_start(job: Job, env: dict[str, str], timeout: float, tmp: Path) -> dict:
    """`leukodiff analyze FIELD` from process start to exit, repeated; median and each run."""
    backend, threads, repeats = job.spec["backend"], job.spec["threads"], job.spec["repeats"]
    exe = Path(sys.executable).with_name("leukodiff")
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "leukodiff.cli"]
    options = ["--backend", backend, "--threads", str(threads)]
    row: dict[str, Any] = {"section": job.section, "name": job.name, "spec": job.spec}
    runs: list[Finished] = []
    for i in range(repeats):
        out = tmp / f"cold-{backend}-{i}"
        command = [*base, "analyze", job.spec["field"], "--out", str(out), *options]
        done = run_process(command, env, timeout)
        if done.rc == 2 and "No such option" in done.stderr and "--threads" in done.stderr:
            options = options[:2]  # an older CLI: threads from the environment only
            done = run_process(command[:-2], env, timeout)
        if done.rc == 2 and "No such option" in done.stderr and "--backend" in done.stderr:
            if backend != "torch":
                row.update(status="skipped", reason=f"`leukodiff analyze` has no --backend "
                           f"option: no {backend} backend in this leukodiff")
                return row
            options = []
            done = run_process([*base, "analyze", job.spec["field"], "--out", str(out)],
                               env, timeout)
        if done.rc != 0:
            reason = _last_line(done.stderr) or _last_line(done.stdout)
            status = "skipped" if "backend" in reason.lower() and backend != "torch" else "failed"
            row.update(status=status, reason=f"exit {done.rc}: {reason}")
            return row
        runs.append(done)
    walls = sorted(r.wall_s for r in runs)
    row.update(status="ok", wall_s=sum(walls), peak_rss_mb=max(r.peak_rss_mb for r in runs),
               metrics={
        "median_s": walls[len(walls) // 2], "min_s": walls[0], "max_s": walls[-1],
        "runs_s": [r.wall_s for r in runs], "cpu_s": [r.cpu_s for r in runs],
        "command": " ".join(["leukodiff", "analyze", Path(job.spec["field"]).name,
                             "--out", "TMP", *options])})
    return row


def plan(args: argparse.Namespace) -> list[Job]:
    """Every job of the run, in order, with a rough duration for 2 cores."""
    quick, threads = args.quick, args.threads
    base = {"threads": threads, "fields": args.fields, "warmup": args.warmup, "runs": args.runs,
            "data_root": args.data_root}
    scale = args.runs / 60  # estimates below are for 60 runs
    jobs: list[Job] = []
    sections = args.only or SECTIONS
    if "latency" in sections:
        for backend, per_run in (("onnx", 0.03), ("torch", 0.05)):
            jobs.append(Job("latency", f"leukodiff {backend}",
                            {**base, "kind": "pipeline", "backend": backend},
                            4 + 80 * per_run * scale))
        for name, per_run in zip(PEERS, (0.08, 0.35), strict=True):
            jobs.append(Job("latency", name, {**base, "kind": "torchvision", "model": name},
                            5 + 70 * per_run * scale))
        jobs.append(Job("latency", "yolov8n", {**base, "kind": "yolo"}, 5 + 70 * 0.06 * scale))
    if "onnx" in sections:
        jobs += onnx_jobs(args, base)
    if "level2" in sections:
        for backend, seconds in (("onnx", 15), ("torch", 25)):
            jobs.append(Job("level2", f"level 2 {backend}",
                            {**base, "kind": "level2", "backend": backend, "batches": [1, 64]},
                            3 + seconds * scale))
    if "coldstart" in sections:
        for backend, seconds in (("onnx", 1.5), ("torch", 4.0)):
            jobs.append(Job("coldstart", f"leukodiff analyze --backend {backend}",
                            {"backend": backend, "threads": threads, "field": "",
                             "repeats": 1 if quick else 3},
                            seconds * (1 if quick else 3)))
    if "scaling" in sections:
        configs = list(dict.fromkeys([(1, 1), (1, threads), (threads, 1)]))
        sizes = args.scaling_sizes
        per_field = 0.035 if args.scaling_backend == "onnx" else 0.06
        jobs.append(Job("scaling", f"scaling {args.scaling_backend}",
                        {**base, "kind": "scaling", "backend": args.scaling_backend,
                         "configs": configs, "sizes": sizes},
                        len(configs) * (3 + per_field * 1.3 * sum(sizes))))
    if "slides" in sections:
        jobs += slides_jobs(args)
    if "wholeslide" in sections:
        side, grid = WSI_SIDE_GRID[quick]
        jobs.append(Job("wholeslide", "build the synthetic slide",
                        {"kind": "wsi_build", "side": side, "grid": grid, "path": "",
                         "data_root": args.data_root}, 2 + side * side / 1e6 * 0.02,
                        timeout_s=max(args.timeout, 1800)))
        jobs.append(Job("wholeslide", "analyze the synthetic slide",
                        {"kind": "wsi", "path": "", "threads": threads},
                        10 + grid * grid * 1.0 + side * side / 1e6 * 0.01,
                        timeout_s=max(args.timeout, 1800)))
    if "profile" in sections:
        prof = {**base, "runs": max(2, min(args.runs, 10))}
        jobs.append(Job("profile", "torch.profiler, torch pipeline",
                        {**prof, "kind": "profile_torch"}, 8))
        jobs.append(Job("profile", "onnxruntime profiler",
                        {**prof, "kind": "profile_onnx", "tmp": ""}, 5))
    if "training" in sections and not quick:
        for task in ("mononuclear", "polymorphonuclear"):
            for mode, seconds in (("frozen", 8), ("finetune", 10)):
                jobs.append(Job("training", f"{task} {mode}",
                                {"kind": "training", "item": "classifier", "task": task,
                                 "mode": mode, "threads": threads, "steps": args.train_steps},
                                seconds))
        jobs.append(Job("training", "detector",
                        {"kind": "training", "item": "detector", "threads": threads,
                         "steps": args.train_steps, "data_root": args.data_root}, 40))
    return jobs


def onnx_jobs(args: argparse.Namespace, base: dict) -> list[Job]:
    """Every ONNX system at each thread count of --onnx-threads, after one export job."""
    from benchmarks.peers_onnx import TORCHVISION_MODEL, YOLO_MODELS

    jobs = [Job("onnx", "export the peers to ONNX",
                {"kind": "onnx_export", "threads": args.threads, "tmp": ""}, 25)]
    scale = args.runs / 60
    for threads in args.onnx_threads:
        spec = {**base, "threads": threads, "tmp": ""}
        suffix = f", {threads} thread{'s' if threads > 1 else ''}"
        jobs.append(Job("onnx", "leukodiff onnx" + suffix,
                        {**spec, "kind": "pipeline", "backend": "onnx"}, 4 + 80 * 0.04 * scale))
        for model in YOLO_MODELS:
            jobs.append(Job("onnx", f"{model} onnx{suffix}",
                            {**spec, "kind": "yolo_onnx", "model": model},
                            6 + 70 * 0.05 * scale))
        jobs.append(Job("onnx", f"{TORCHVISION_MODEL} onnx{suffix}",
                        {**spec, "kind": "torchvision_onnx"}, 4 + 70 * 0.12 * scale))
    return jobs


def slides_jobs(args: argparse.Namespace) -> list[Job]:
    """`leukodiff analyze --slides`: 2 workers vs 1, and peak RSS small vs large."""
    quick, per_slide = args.quick, SLIDES_PER_SLIDE[args.quick]
    fields, sizes = SLIDES_FIELDS[quick], MEMORY_SIZES[quick]
    common = {"per_slide": per_slide, "tmp": "", "data_root": args.data_root}
    workers_s, memory_s = 10 + fields * 0.11, 10 + sum(sizes) * 0.05
    return [Job("slides", f"analyze --slides, --workers 1 vs 2, {fields:,} fields",
                {**common, "kind": "slides_workers", "fields": fields,
                 "timeout": max(args.timeout, 20 * workers_s)},
                workers_s, timeout_s=max(args.timeout, 60 * workers_s)),
            Job("slides", "analyze --slides, peak RSS, " + " vs ".join(f"{n:,}" for n in sizes)
                + " fields", {**common, "kind": "slides_memory", "sizes": sizes,
                              "timeout": max(args.timeout, 20 * memory_s)},
                memory_s, timeout_s=max(args.timeout, 60 * memory_s))]


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cpus = os.cpu_count() or 1
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 3 fields, 3 runs, batches of 1 and 10, no training")
    parser.add_argument("--out", type=Path, default=REPO / "docs",
                        help="folder for BENCHMARKS.md and figures/ [default: docs/]")
    parser.add_argument("--threads", type=int, default=cpus,
                        help=f"threads for every system [default: all cores, {cpus}]")
    parser.add_argument("--runs", type=int, help="timed runs per system [60; quick 3]")
    parser.add_argument("--warmup", type=int, help="untimed runs first [5; quick 1]")
    parser.add_argument("--fields", type=int,
                        help="distinct BCCD VOC-test fields [all 72 with a white cell; quick 3]")
    parser.add_argument("--only", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                        help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--scaling-backend", default="onnx", choices=("onnx", "torch"))
    parser.add_argument("--scaling-sizes", type=lambda s: [int(x) for x in s.split(",")],
                        help="batch sizes in fields [1,10,100,1000; quick 1,10]")
    parser.add_argument("--onnx-threads", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 2], help="thread counts of the onnxruntime peers [1,2]")
    parser.add_argument("--train-steps", type=int, default=3,
                        help="timed training steps per model (after one warm-up step)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per subprocess")
    parser.add_argument("--from-json", type=Path,
                        help="re-render the page from a run's raw benchmarks.json, run nothing")
    parser.add_argument("--plan", action="store_true",
                        help="list the systems and the time estimate, run nothing")
    parser.add_argument("--data-root", default=None,
                        help="folder holding bccd/ [default: as leukodiff finds it]")
    args = parser.parse_args(argv)
    quick = args.quick
    args.runs = args.runs or (3 if quick else 60)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 5)
    args.fields = args.fields or (3 if quick else 1000)
    args.scaling_sizes = args.scaling_sizes or ([1, 10] if quick else [1, 10, 100, 1000])
    if args.only and (unknown := set(args.only) - set(SECTIONS)):
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if not quick and args.runs < 50:
        print(f"note: {args.runs} runs per system (the issue asks for at least 50)")
    return args


def main(argv: list[str] | None = None) -> int:
    from benchmarks import report
    from benchmarks.common import bench_fields

    args = parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        paths = report.write(saved["rows"], saved["meta"], args.out)
        print("wrote " + ", ".join(str(p) for p in paths))
        return 0
    started, load_before = time.perf_counter(), load_average()
    try:
        fields = bench_fields(args.fields, args.data_root)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    jobs = plan(args)
    total_estimate = sum(j.estimate_s for j in jobs)
    print(f"leukodiff benchmarks{' (quick)' if args.quick else ''}: {len(jobs)} systems, "
          f"{len(fields)} fields, {args.runs} runs each, {args.threads} thread(s); "
          f"estimated {_clock(total_estimate)} (min:s) on 2 idle cores; "
          f"load average {load_before}", flush=True)
    if args.plan:
        for job in jobs:
            print(f"  {job.section:10s} {job.name:45s} ~{job.estimate_s:5.0f} s")
        return 0
    env = set_thread_env(args.threads, dict(os.environ))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="leukodiff-bench-") as tmp_name:
        tmp = Path(tmp_name)
        env.update(YOLO_OFFLINE="1", YOLO_CONFIG_DIR=str(tmp / "ultralytics"),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                            env.get("PYTHONPATH")])))
        remaining = total_estimate
        for number, job in enumerate(jobs, 1):
            print(f"[{number:2d}/{len(jobs)}] {job.section}: {job.name} ...", end=" ",
                  flush=True)
            if job.section == "coldstart":
                job.spec["field"] = str(fields[0].image)
                row = cold_start(job, env, args.timeout, tmp)
            else:
                if "tmp" in job.spec:
                    job.spec["tmp"] = str(tmp)
                if "path" in job.spec:
                    job.spec["path"] = str(tmp / "wholeslide" / "slide.ome.tif")
                job_env = set_thread_env(job.spec.get("threads", args.threads), dict(env))
                row = run_child(job, job_env, job.timeout_s or args.timeout)
            rows.append(row)
            remaining -= job.estimate_s
            elapsed = time.perf_counter() - started
            detail = row.get("reason", "") if row["status"] != "ok" else _headline(row)
            print(f"{row['status']} {detail} ({row.get('wall_s', 0):.1f} s; elapsed "
                  f"{_clock(elapsed)}, ~{_clock(max(remaining, 0))} left)", flush=True)
    meta = report.machine(args, load_before, load_average(), time.perf_counter() - started,
                          [str(f.image) for f in fields])
    paths = report.write(rows, meta, args.out)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _headline(row: dict) -> str:
    metrics = row.get("metrics", {})
    if "median_ms" in metrics:
        return f"median {metrics['median_ms']:.1f} ms, p90 {metrics['p90_ms']:.1f} ms"
    if "median_s" in metrics:
        return f"median {metrics['median_s']:.2f} s"
    if "epoch_s" in metrics:
        return f"{metrics['epoch_s']:.1f} s/epoch"
    if "rows" in metrics:  # level 2
        best = max(metrics["rows"].values(), key=lambda r: r["crops_per_s"])
        return f"up to {best['crops_per_s']:.0f} crops/s (batch {best['batch']})"
    if "side" in metrics:  # the whole slide
        from benchmarks.wholeslide import describe

        return describe(metrics) if "found_once" in metrics else (
            f"{metrics['megapixels']:,.0f} MP, {metrics['file_mb']:.0f} MB")
    if "sizes" in metrics:  # slides, memory
        return "; ".join(f"{n} fields: peak {r['tree_peak_rss_mb']:.0f} MiB"
                         for n, r in metrics["sizes"].items())
    if "per_slide" in metrics:  # slides, workers
        return "; ".join(f"{label}: {r['fields_per_s']:.1f} fields/s"
                         for label, r in metrics["configs"].items())
    if "configs" in metrics:  # scaling
        return "; ".join(f"{label}: {c['rows'][-1]['fields_per_s']:.1f} fields/s"
                         for label, c in metrics["configs"].items())
    return ""


if __name__ == "__main__":
    sys.exit(main())
