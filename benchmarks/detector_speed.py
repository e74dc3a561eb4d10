"""Milliseconds per 640x480 BCCD field through the level-1 detector (median of N runs).

    python benchmarks/detector_speed.py [--model detector] [--runs 30] [--threads 2]

Times `leukodiff.models.detector.predict` on one decoded field, end to end
(tensor conversion, Faster R-CNN, class-agnostic NMS, group classifier on the
boxes it finds), after warm-up runs; also without the group classifier.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from leukodiff.data.sources import load_fields
from leukodiff.imaging import load_image
from leukodiff.models.detector import DetectorSpec, build_detector, predict
from leukodiff.models.io import load_detector, shipped


def time_predict(model, image, runs: int, **options) -> list[float]:
    for _ in range(3):
        predict(model, image, **options)
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        predict(model, image, **options)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="detector", help="detector .pt or shipped name")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--field", default="BloodImage_00015", help="BCCD field to time on")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "detector" and not shipped("detector").exists():
        print("no shipped detector: timing an untrained one (same architecture)")
        model = build_detector(DetectorSpec(), pretrained=False).eval()
    else:
        model, _ = load_detector(args.model)
    record = next(r for r in load_fields("bccd").records if r.image.stem == args.field)
    image = load_image(record.image)
    print(f"{args.field} {image.width}x{image.height}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.runs} runs")
    for name, options in (("detector + group classifier", {}),
                          ("Faster R-CNN only (refine=False)", {"refine": False})):
        seconds = time_predict(model, image, args.runs, **options)
        found = predict(model, image, score_threshold=model.spec.score_threshold, **options)[0]
        print(f"{name}: median {1000 * statistics.median(seconds):.1f} ms, "
              f"min {1000 * min(seconds):.1f} ms  ({len(found.boxes)} cells found)")


if __name__ == "__main__":
    main()
