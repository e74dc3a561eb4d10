"""The slide job on the two engines, for docs/SCALING.md: `leukodiff analyze --slides`
with `--engine local` (a process pool) and `--engine ray` (a local Ray instance), the
same workers (one thread each), on BCCD fields grouped into slides.

    OMP_NUM_THREADS=1 python -m benchmarks.slides_engines --fields 200 --slides 10

Each engine runs on a few fields and on all of them, each run a fresh process (start-up
included: Python, models, pool or Ray), the engines alternating (`--rounds`, each round
local, ray, ray, local, so a machine whose load drifts favours neither); the time per
field is the difference between the two runs over the difference in fields, so start-up
cancels. Wall seconds, and CPU seconds (user+sys of every process of the run, Ray's
raylet, GCS and actors included, sampled from /proc every 0.2 s): on a busy machine the
CPU seconds are the steadier figure, and what a cloud bill counts. Prints one JSON object
(and writes it with --json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from leukodiff.data.root import data_root


def make_slides(root: Path, fields: int, slides: int) -> Path:
    """`slides` folders of BCCD fields (links), `fields` in all, in file-name order."""
    images = sorted((data_root() / "bccd" / "BCCD" / "JPEGImages").glob("*.jpg"))
    if len(images) < fields:
        raise SystemExit(f"only {len(images)} BCCD fields, asked for {fields}")
    for number, image in enumerate(images[:fields]):
        folder = root / f"slide{number % slides:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / image.name).symlink_to(image)
    return root


TICK = os.sysconf("SC_CLK_TCK")


def _tree_cpu(root: int, seen: dict[tuple[int, str], float]) -> None:
    """CPU seconds so far of `root` and every process under it, into `seen` (keyed by
    pid and start time, so a reused pid is another process)."""
    parents: dict[int, int] = {}
    stats: dict[int, list[str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        parents[pid], stats[pid] = int(fields[1]), fields
    tree, todo = {root}, [root]
    while todo:
        parent = todo.pop()
        for child in [c for c, p in parents.items() if p == parent and c not in tree]:
            tree.add(child)
            todo.append(child)
    for pid in tree & set(stats):
        fields = stats[pid]  # after the command: state=0, ppid=1, ... utime=11, stime=12
        seen[(pid, fields[19])] = (int(fields[11]) + int(fields[12])) / TICK


def run(engine: str, slides: Path, out: Path, workers: int) -> tuple[float, float]:
    """Wall seconds and CPU seconds of one `analyze --slides` run, start to exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "leukodiff.cli", "analyze", str(slides), "--slides",
               "--out", str(out), "--workers", str(workers), "--engine", engine]
    seen: dict[tuple[int, str], float] = {}
    started = time.perf_counter()
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process:
        while process.poll() is None:
            _tree_cpu(process.pid, seen)
            time.sleep(0.2)
        output = process.stdout.read() if process.stdout else ""
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{engine} failed:\n{output[-3000:]}")
    return seconds, sum(seen.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, default=200)
    parser.add_argument("--few", type=int, default=20, help="fields of the short run")
    parser.add_argument("--slides", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict = {"fields": args.fields, "few": args.few, "slides": args.slides,
                     "workers": args.workers, "cpus": os.cpu_count(),
                     "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        many = make_slides(root / "many", args.fields, args.slides)
        few = make_slides(root / "few", args.few, max(1, args.slides * args.few // args.fields))
        runs: dict[str, list] = {"local": [], "ray": []}
        for number, engine in enumerate(["local", "ray", "ray", "local"] * args.rounds):
            short = run(engine, few, root / f"few{number}", args.workers)
            long = run(engine, many, root / f"many{number}", args.workers)
            runs[engine].append((short, long))
        extra = args.fields - args.few
        for engine, pairs in runs.items():
            wall = sum(long[0] - short[0] for short, long in pairs) / len(pairs) / extra
            cpu = sum(long[1] - short[1] for short, long in pairs) / len(pairs) / extra
            results[engine] = {
                "runs (few, all: wall s, cpu s)": [[[round(v, 2) for v in short],
                                                    [round(v, 2) for v in long]]
                                                   for short, long in pairs],
                "wall_seconds_per_field": round(wall, 4), "cpu_seconds_per_field": round(cpu, 4),
                "start_up_wall_seconds": round(sum(short[0] for short, _ in pairs)
                                               / len(pairs) - args.few * wall, 2)}
    results["load_after"] = os.getloadavg()
    for key in ("wall", "cpu"):
        results[f"ray_vs_local_{key}"] = round(results["ray"][f"{key}_seconds_per_field"]
                                               / results["local"][f"{key}_seconds_per_field"], 3)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
