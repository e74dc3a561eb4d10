"""Helpers shared by the benchmark parent and its measuring subprocesses.

Kept free of torch imports: an onnxruntime child must not pay torch's memory
just because a helper imported it, or its peak RSS would be wrong.
"""

from __future__ import annotations

import itertools
import os
import resource
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

#: Prefix of the one stdout line a child writes with its JSON result.
RESULT_MARK = "BENCH-RESULT "
REPO = Path(__file__).resolve().parents[1]
#: Thread-count environment variables set identically for every measured process.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class Skip(Exception):
    """A system that cannot be measured here (missing backend, extra not installed)."""


def summarize(values_ms: Sequence[float]) -> dict[str, float]:
    """Median, p90 (linear interpolation), mean, min, max and count of timings in ms."""
    values = sorted(values_ms)
    if not values:
        return {"runs": 0}
    p90 = (statistics.quantiles(values, n=10, method="inclusive")[8]
           if len(values) > 1 else values[0])
    return {"runs": len(values), "median_ms": statistics.median(values), "p90_ms": p90,
            "mean_ms": statistics.fmean(values), "min_ms": values[0], "max_ms": values[-1]}


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def cycle(items: Sequence[Any], count: int) -> list[Any]:
    """`count` items, repeating `items` in order (batches larger than the field list)."""
    return list(itertools.islice(itertools.cycle(items), count))


def time_calls(call: Callable[[Any], Any], inputs: Sequence[Any], warmup: int, runs: int
               ) -> tuple[list[float], list[Any], float]:
    """Per-call wall times (ms) of `runs` calls after `warmup` untimed ones, cycling inputs.

    Returns (times, outputs, CPU seconds of this process over the timed calls).
    """
    for item in cycle(inputs, warmup):
        call(item)
    times, outputs = [], []
    cpu_start = time.process_time()
    for item in cycle(inputs, runs):
        start = time.perf_counter()
        outputs.append(call(item))
        times.append(1000 * (time.perf_counter() - start))
    return times, outputs, time.process_time() - cpu_start


def bench_fields(count: int, data_root: str | Path | None = None) -> list:
    """The first `count` BCCD VOC-test fields with a white-cell box (never trained on).

    Found the way the package finds data (`leukodiff.data.root`); read by path.
    """
    from leukodiff.data.sources import load_fields

    records = sorted((r for r in load_fields("bccd", data_root).records
                      if r.subset == "test" and r.wbc_boxes), key=lambda r: r.image.name)
    if not records:
        raise Skip("no BCCD VOC test fields found under the data root")
    return records[:count]


def load_rgb(paths: Iterable[Path]) -> list:
    """Decoded RGB PIL images, through the package's one image loader."""
    from leukodiff.imaging import load_image, to_rgb

    return [to_rgb(load_image(p)) for p in paths]


class NetworkGuard:
    """Refuses (and counts) every IP connection: proves a system downloads nothing.

    Unix sockets and pipes (multiprocessing) still work.
    """

    def __init__(self) -> None:
        self.attempts: list[str] = []
        self._original = socket.socket.connect

    def install(self) -> NetworkGuard:
        guard, original = self, self._original

        def connect(sock: socket.socket, address: Any) -> None:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                guard.attempts.append(str(address))
                raise OSError(f"benchmark: network access refused ({address})")
            original(sock, address)

        socket.socket.connect = connect  # type: ignore[method-assign]
        return self


def set_thread_env(threads: int, env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: os.environ) with every thread-count variable set to `threads`."""
    target = os.environ if env is None else env
    for name in THREAD_ENV:
        target[name] = str(threads)
    return dict(target)
