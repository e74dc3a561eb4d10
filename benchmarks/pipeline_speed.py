"""Whole-pipeline speed (detection + classification of every cell) on real BCCD fields.

    python benchmarks/pipeline_speed.py --fields 50 --threads 1

Prints the median and p90 milliseconds per 640x480 field after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from leukodiff.data.sources import load_fields
from leukodiff.imaging import load_image
from leukodiff.pipeline import Analyzer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, default=50)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fields = [f for f in load_fields("bccd", args.data_root).records if f.subset == "test"]
    images = [load_image(f.image) for f in fields[: args.fields]]
    analyzer = Analyzer.load()
    for image in images[:3]:  # warm-up
        analyzer(image)
    times, cells = [], 0
    for image in images:
        start = time.perf_counter()
        cells += len(analyzer(image).cells)
        times.append(1000 * (time.perf_counter() - start))
    times.sort()
    print(f"torch backend, {args.threads} thread(s), {len(images)} fields, {cells} cells: "
          f"median {statistics.median(times):.1f} ms/field, "
          f"p90 {times[int(0.9 * (len(times) - 1))]:.1f} ms")


if __name__ == "__main__":
    main()
