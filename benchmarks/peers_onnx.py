"""Peers on onnxruntime, so that "faster than" compares like with like.

leukodiff ships its networks as ONNX and runs them on onnxruntime; the peers'
torch rows (`systems.py`) compare a runtime as much as a model. Here every peer
is exported to ONNX by its own project's exporter and timed on the same
onnxruntime CPU session settings (intra-op threads = the row's threads, one
inter-op thread) on the same decoded BCCD fields at the same size (640x480,
640 px long side):

- YOLOv8n and YOLO11n: built from ultralytics' own `yolov8n.yaml` / `yolo11n.yaml`
  (random weights: nothing is downloaded; speed does not depend on weights),
  exported by ultralytics' exporter (`model.export(format="onnx")`, its default
  onnxslim pass included) at imgsz 480x640, and timed over ultralytics' own
  `predict` on that ONNX file (letterbox, onnxruntime, NMS), its session replaced
  by one with the row's thread count.
- torchvision's fasterrcnn_mobilenet_v3_large_320_fpn (random weights) with
  min_size 480 / max_size 640 (the field's own size, as leukodiff's detector
  sees it), exported by `torch.onnx.export` (the graph holds torchvision's
  resize, normalisation and post-processing), timed from the decoded image.

The export runs in its own child (`export` kind, torch loaded there); the
timing children load the ONNX files. Random weights find almost nothing, so
the peers' NMS is if anything cheaper than a trained model's.
"""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Skip, bench_fields, load_rgb, summarize, time_calls

#: ultralytics models built from their yaml; the file each export writes under the tmp dir.
YOLO_MODELS = ("yolov8n", "yolo11n")
TORCHVISION_MODEL = "fasterrcnn_mobilenet_v3_large_320_fpn"
#: The field's own size (height, width): every peer is exported at it.
FIELD_HW = (480, 640)
OPSET = 17  # the opset leukodiff's own export uses (models/export.py)


def peer_dir(tmp: str | Path) -> Path:
    return Path(tmp) / "onnx-peers"


def export(spec: dict) -> dict:
    """Export every peer to ONNX under spec["tmp"]; what was exported and how long it took."""
    import torch

    torch.set_num_threads(spec["threads"])
    out = peer_dir(spec["tmp"])
    out.mkdir(parents=True, exist_ok=True)
    done: dict[str, Any] = {}
    start = time.perf_counter()
    path = out / f"{TORCHVISION_MODEL}.onnx"
    _export_torchvision(path)
    done[TORCHVISION_MODEL] = {"file": path.name, "mb": path.stat().st_size / 1e6,
                               "seconds": time.perf_counter() - start,
                               "exporter": f"torch.onnx.export (opset {OPSET}, dynamo=False)"}
    try:
        import ultralytics
        from ultralytics import YOLO, settings
    except ImportError as error:
        done["ultralytics"] = f"not installed ({error}): pip install -e '.[bench]'"
        return done
    settings.update({"sync": False})
    try:
        import onnxslim  # noqa: F401 - ultralytics would pip-install it if absent
        simplify, how = True, "onnxslim pass"
    except ImportError:
        simplify, how = False, "no onnxslim pass: onnxslim not installed"
    here = Path.cwd()
    os.chdir(out)  # ultralytics writes a yaml-built model's export into the working folder
    try:
        for name in YOLO_MODELS:
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                written = Path(YOLO(f"{name}.yaml").export(
                    format="onnx", imgsz=list(FIELD_HW), device="cpu", simplify=simplify))
            written = written if written.is_absolute() else out / written
            done[name] = {"file": written.name, "mb": written.stat().st_size / 1e6,
                          "seconds": time.perf_counter() - start,
                          "exporter": f"ultralytics {ultralytics.__version__} "
                                      f"model.export(format='onnx', imgsz=[480, 640]), {how}"}
    finally:
        os.chdir(here)
    return done


def _export_torchvision(path: Path) -> None:
    import warnings

    import torch
    from torchvision.models import detection

    model = getattr(detection, TORCHVISION_MODEL)(
        weights=None, weights_backbone=None, min_size=FIELD_HW[0], max_size=FIELD_HW[1]).eval()
    example = torch.rand(3, *FIELD_HW)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings of torchvision's detection code
        torch.onnx.export(model, ([example],), str(path), opset_version=OPSET,
                          input_names=["image"], output_names=["boxes", "labels", "scores"],
                          dynamo=False)


def _session(path: Path, threads: int):
    from benchmarks.systems import ort_session

    if not path.is_file():
        raise Skip(f"{path.name} was not exported (see the export row)")
    return ort_session(path, threads)


def torchvision_onnx(spec: dict) -> dict:
    """torchvision's detector on onnxruntime, from the decoded field to boxes."""
    threads = spec["threads"]
    session = _session(peer_dir(spec["tmp"]) / f"{TORCHVISION_MODEL}.onnx", threads)
    images = load_rgb(f.image for f in bench_fields(spec["fields"], spec.get("data_root")))

    def detect(image: Any) -> int:
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return len(session.run(None, {"image": np.ascontiguousarray(pixels)})[0])

    times, found, cpu = time_calls(detect, images, spec["warmup"], spec["runs"])
    return {**summarize(times), "cpu_ms_per_field": 1000 * cpu / len(times),
            "detections_per_field": statistics.fmean(found), "fields": len(images),
            "network_input": f"{FIELD_HW[1]}x{FIELD_HW[0]}", "threads": threads,
            "how": "onnxruntime session on the exported graph (resize, normalise, RPN, "
                   "RoI heads, NMS inside)"}


def yolo_onnx(spec: dict) -> dict:
    """ultralytics' predict on the exported ONNX file, onnxruntime with the row's threads."""
    try:
        import ultralytics
        from ultralytics import YOLO, settings
    except ImportError as error:
        raise Skip(f"ultralytics not installed ({error}); "
                   "install the extra: pip install -e '.[bench]'") from None
    import torch

    threads, name = spec["threads"], spec["model"]
    settings.update({"sync": False})
    path = peer_dir(spec["tmp"]) / f"{name}.onnx"
    session = _session(path, threads)
    model = YOLO(str(path), task="detect")
    images = load_rgb(f.image for f in bench_fields(spec["fields"], spec.get("data_root")))
    speeds: list[dict] = []

    def detect(image: Any) -> int:
        # ultralytics takes numpy images as OpenCV BGR
        result = model.predict(np.asarray(image)[:, :, ::-1], imgsz=list(FIELD_HW),
                               device="cpu", verbose=False)[0]
        speeds.append(result.speed)
        return len(result.boxes)

    detect(images[0])  # builds the predictor (its own session: replaced below)
    backend = model.predictor.model.backend
    if not hasattr(backend, "session"):
        raise Skip(f"ultralytics {ultralytics.__version__}: no onnxruntime session to set "
                   "threads on")
    backend.session = session  # same graph; the row's thread count
    torch.set_num_threads(threads)  # ultralytics' NMS runs in torch
    speeds.clear()
    times, found, cpu = time_calls(detect, images, spec["warmup"], spec["runs"])
    timed = speeds[-len(times):]
    split = {k: statistics.median(s[k] for s in timed) for k in timed[0]} if timed else {}
    return {**summarize(times), "cpu_ms_per_field": 1000 * cpu / len(times),
            "detections_per_field": statistics.fmean(found), "fields": len(images),
            "network_input": f"{FIELD_HW[1]}x{FIELD_HW[0]}", "threads": threads,
            "ultralytics": ultralytics.__version__, "split_median_ms": split,
            "how": "ultralytics predict on the ONNX file (letterbox, onnxruntime, NMS)"}
