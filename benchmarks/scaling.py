"""Throughput on batches of fields with worker processes, and its cost in CPU-seconds.

A spawn pool of W workers, each loading the Analyzer once with T threads,
analyses a batch of field paths (JPEG decoding included: this is what a user's
`leukodiff analyze` of a folder does). The CPU cost is the workers' user+sys
time from /proc (idle thread spinning included), plus the driver's own.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Skip, bench_fields, cycle, set_thread_env

_analyzer: Any = None
_error: str | None = None


def _init(backend: str, threads: int, warm_path: str, barrier: Any) -> None:
    """Worker start: load the Analyzer once, warm it, wait until every worker is ready."""
    global _analyzer, _error
    try:
        from benchmarks.systems import load_analyzer, set_torch_threads

        if backend == "torch":
            set_torch_threads(threads)
        _analyzer, _ = load_analyzer(backend, threads)
        for _ in range(2):
            _analyzer(warm_path)
    except BaseException as error:  # reported through _ready; a raising initializer respawns
        _error = f"{type(error).__name__}: {error}"
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait(timeout=600)


def _ready(_: int) -> str | None:
    return _error


def _analyze(path: str) -> int:
    return len(_analyzer(path).cells)


def _proc_cpu_s(pid: int) -> float:
    """user + sys CPU seconds of a live process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_peak_rss_mb(pid: int) -> float | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def _cpu_s(pids: list[int]) -> float:
    return sum(_proc_cpu_s(pid) for pid in pids) + time.process_time()


def run_config(backend: str, workers: int, threads: int, paths: list[str], sizes: list[int]
               ) -> dict:
    """Fields per second and CPU cost for each batch size, one pool configuration."""
    ctx = mp.get_context("spawn")
    set_thread_env(threads)  # inherited by the spawned workers
    barrier = ctx.Barrier(workers)
    started = time.perf_counter()
    with ctx.Pool(workers, initializer=_init,
                  initargs=(backend, threads, paths[0], barrier)) as pool:
        errors = [e for e in pool.map(_ready, range(workers), chunksize=1) if e]
        if errors:
            raise Skip(f"{backend} workers could not load the Analyzer: {errors[0]}")
        startup = time.perf_counter() - started
        pids = [p.pid for p in mp.active_children() if p.pid is not None]
        rows = []
        for size in sizes:
            batch = cycle(paths, size)
            cpu_start, start = _cpu_s(pids), time.perf_counter()
            cells = sum(pool.imap_unordered(_analyze, batch, chunksize=1))
            wall = time.perf_counter() - start
            cpu = _cpu_s(pids) - cpu_start
            rows.append({"fields": size, "wall_s": wall, "fields_per_s": size / wall,
                         "cpu_s": cpu, "cpu_s_per_1000_fields": 1000 * cpu / size,
                         "cells": cells})
        peaks = [_proc_peak_rss_mb(pid) for pid in pids]
    return {"workers": workers, "threads": threads, "startup_s": startup, "rows": rows,
            "worker_peak_rss_mb": peaks}


def scaling(spec: dict) -> dict:
    """Every (workers, threads) configuration of the spec, on the same batches of fields."""
    if not Path("/proc/self/stat").exists():
        raise Skip("CPU accounting of pool workers reads /proc (Linux only)")
    paths = [str(f.image) for f in bench_fields(spec["fields"], spec.get("data_root"))]
    configs = {}
    for workers, threads in spec["configs"]:
        label = f"{workers} worker{'s' if workers > 1 else ''} x {threads} thread" + (
            "s" if threads > 1 else "")
        configs[label] = run_config(spec["backend"], workers, threads, paths, spec["sizes"])
    return {"backend": spec["backend"], "distinct_fields": len(paths), "configs": configs}
