"""What one measuring subprocess runs: one system, timed on decoded BCCD fields.

Each function takes the child's spec (dict) and returns a JSON-able dict of
metrics, or raises `Skip` with the reason the system cannot run here. Every
timed call starts from a decoded RGB PIL image (what `Analyzer.__call__`
takes), so tensor conversion and pre/post-processing count for every system.
"""

from __future__ import annotations

import inspect
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Skip, bench_fields, cycle, load_rgb, summarize, time_calls

#: torchvision peers and the resize each runs at ("native": the field's own 640x480).
TORCHVISION_PEERS: dict[str, dict[str, int]] = {
    # The _320_ model resizes to a 320-pixel short side by design: kept as torchvision ships it.
    "fasterrcnn_mobilenet_v3_large_320_fpn": {},
    # Default min_size=800 would upscale a 640x480 field; 480/640 keeps it native.
    "fasterrcnn_mobilenet_v3_large_fpn": {"min_size": 480, "max_size": 640},
}


def set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def torch_threads() -> int | None:
    """Threads torch will use now, or None when torch was never imported in this process."""
    if "torch" not in sys.modules:
        return None
    return sys.modules["torch"].get_num_threads()


# --- leukodiff -------------------------------------------------------------------------------


def load_analyzer(backend: str, threads: int) -> tuple[Any, str]:
    """`Analyzer.load` on `backend`, refusing a silent fallback to another backend.

    Returns (analyzer, note). A leukodiff without the `backend` option is torch-only.
    """
    from leukodiff.pipeline import Analyzer

    params = inspect.signature(Analyzer.load).parameters
    if "backend" not in params:
        if backend == "torch":
            return Analyzer.load(), "Analyzer.load has no backend option: torch only"
        raise Skip(f"this leukodiff has no {backend} backend (Analyzer.load takes no backend=)")
    kwargs: dict[str, Any] = {"backend": backend}
    for name in ("threads", "num_threads"):
        if name in params:
            kwargs[name] = threads
    try:
        analyzer = Analyzer.load(**kwargs)
    except Exception as error:  # any reason the backend cannot load is a skip, not a crash
        if backend == "torch":
            raise
        raise Skip(f"{backend} backend did not load: {type(error).__name__}: {error}") from None
    actual = getattr(getattr(analyzer, "backend", None), "name", "torch")
    if actual != backend:
        raise Skip(f"asked for the {backend} backend, Analyzer.load gave {actual}")
    note = "" if len(kwargs) > 1 else "threads set by environment (Analyzer.load takes none)"
    return analyzer, note


def close(analyzer: Any) -> None:
    if hasattr(analyzer, "close"):
        analyzer.close()


def pipeline(spec: dict) -> dict:
    """leukodiff's whole pipeline per field: level 1 + level 2 for every cell found."""
    backend, threads = spec["backend"], spec["threads"]
    if backend == "torch":
        set_torch_threads(threads)
    start = time.perf_counter()
    import leukodiff.pipeline  # noqa: F401 - timed: part of the cold start

    imported = time.perf_counter()
    analyzer, note = load_analyzer(backend, threads)
    loaded = time.perf_counter()
    fields = bench_fields(spec["fields"], spec.get("data_root"))
    images = load_rgb([f.image for f in fields])
    first_start = time.perf_counter()
    analyzer(images[0])
    first = time.perf_counter() - first_start
    times, outputs, cpu = time_calls(analyzer, images, spec["warmup"], spec["runs"])
    result = {**summarize(times), "cpu_ms_per_field": 1000 * cpu / len(times),
              "cells_per_field": statistics.fmean(len(o.cells) for o in outputs),
              "fields": len(images), "image_size": list(images[0].size),
              "backend": backend, "note": note, "torch_threads": torch_threads(),
              "startup_s": {"import leukodiff.pipeline": imported - start,
                            "Analyzer.load": loaded - imported, "first field": first}}
    if hasattr(analyzer, "detect"):  # level 1 alone: where the time goes
        detect_times, _, _ = time_calls(analyzer.detect, images, 1,
                                        max(3, min(spec["runs"], 20)))
        result["level1_median_ms"] = statistics.median(detect_times)
    close(analyzer)
    return result


# --- peers -----------------------------------------------------------------------------------


def torchvision_peer(spec: dict) -> dict:
    """A stock torchvision detector, random weights (no download), eval, inference mode."""
    import torch
    from torchvision.models import detection
    from torchvision.transforms.functional import pil_to_tensor

    name, threads = spec["model"], spec["threads"]
    torch.set_num_threads(threads)
    model = getattr(detection, name)(weights=None, weights_backbone=None,
                                     **TORCHVISION_PEERS[name]).eval()
    images = load_rgb(f.image for f in bench_fields(spec["fields"], spec.get("data_root")))

    @torch.inference_mode()
    def detect(image: Any) -> int:
        return len(model([pil_to_tensor(image).float().div_(255)])[0]["boxes"])

    with torch.inference_mode():
        batch, _ = model.transform([pil_to_tensor(images[0]).float().div_(255)])
    times, found, cpu = time_calls(detect, images, spec["warmup"], spec["runs"])
    height, width = batch.tensors.shape[-2:]
    return {**summarize(times), "cpu_ms_per_field": 1000 * cpu / len(times),
            "detections_per_field": statistics.fmean(found), "fields": len(images),
            "network_input": f"{width}x{height}", "num_classes": 91,
            "resize": TORCHVISION_PEERS[name] or "torchvision default (min_size=320, "
            "max_size=640)", "torch_threads": torch.get_num_threads()}


def yolo_peer(spec: dict) -> dict:
    """ultralytics YOLOv8n from yolov8n.yaml (random weights), full predict at imgsz 640."""
    try:
        import ultralytics
        from ultralytics import YOLO, settings
    except ImportError as error:
        raise Skip(f"ultralytics not installed ({error}); "
                   "install the extra: pip install -e '.[bench]'") from None
    import torch

    threads = spec["threads"]
    settings.update({"sync": False})  # no analytics events (YOLO_OFFLINE=1 is set too)
    model = YOLO("yolov8n.yaml")
    images = load_rgb(f.image for f in bench_fields(spec["fields"], spec.get("data_root")))
    speeds: list[dict] = []

    def detect(image: Any) -> int:
        # ultralytics takes numpy images as OpenCV BGR
        result = model.predict(np.asarray(image)[:, :, ::-1], imgsz=640, device="cpu",
                               verbose=False)[0]
        speeds.append(result.speed)
        return len(result.boxes)

    detect(images[0])  # builds the predictor; its select_device resets torch's threads
    shapes: list[tuple] = []
    preprocess = model.predictor.preprocess

    def record_shape(batch: Any) -> Any:
        tensor = preprocess(batch)
        shapes.append(tuple(tensor.shape))
        return tensor

    model.predictor.preprocess = record_shape
    detect(images[0])
    model.predictor.preprocess = preprocess
    torch.set_num_threads(threads)
    speeds.clear()
    times, found, cpu = time_calls(detect, images, spec["warmup"], spec["runs"])
    timed = speeds[-len(times):]
    split = {k: statistics.median(s[k] for s in timed) for k in timed[0]} if timed else {}
    return {**summarize(times), "cpu_ms_per_field": 1000 * cpu / len(times),
            "detections_per_field": statistics.fmean(found), "fields": len(images),
            "ultralytics": ultralytics.__version__, "imgsz": 640,
            "network_input": f"{shapes[0][-1]}x{shapes[0][-2]}" if shapes else "?",
            "split_median_ms": split, "torch_threads": torch.get_num_threads()}


# --- level 2 alone ---------------------------------------------------------------------------


def weights_dir() -> Path:
    """The shipped models' folder, found without importing torch."""
    import leukodiff

    return Path(leukodiff.__file__).resolve().parent / "models" / "weights"


def real_crops(name: str, count: int, data_root: str | None) -> np.ndarray:
    """(count, 3, S, S) float32 in [0, 1]: BCCD white cells cut as the pipeline cuts them."""
    from leukodiff.data.crops import crop_cell, square_input
    from leukodiff.models.files import read_manifest

    manifest_path = weights_dir() / f"{name}.json"
    if not manifest_path.exists():  # an install with the ONNX files only
        manifest_path = weights_dir() / f"{name}.onnx.json"
    geometry = read_manifest(manifest_path).input
    scale, size = geometry.crop_scale, geometry.size
    fields = bench_fields(max(count, 8), data_root)
    crops = []
    for record, image in zip(fields, load_rgb(f.image for f in fields), strict=True):
        for box in record.wbc_boxes:
            crops.append(np.asarray(square_input(crop_cell(image, box, scale), size)))
    stacked = np.stack(cycle(crops, count)).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(stacked, dtype=np.float32) / 255.0


def level2(spec: dict) -> dict:
    """Crops per second of both level-2 classifiers at each batch size, one backend."""
    backend, threads = spec["backend"], spec["threads"]
    batches: list[int] = spec["batches"]
    rows: dict[str, dict] = {}
    for name in ("mononuclear", "polymorphonuclear"):
        crops = real_crops(name, max(batches), spec.get("data_root"))
        run = torch_classifier(name, threads) if backend == "torch" else ort_classifier(name,
                                                                                      threads)
        for batch in batches:
            inputs = [crops[:batch]]
            times, _, cpu = time_calls(run, inputs, spec["warmup"], spec["runs"])
            stats = summarize(times)
            rows[f"{name} batch {batch}"] = {
                **stats, "model": name, "batch": batch,
                "crops_per_s": 1000 * batch / stats["median_ms"],
                "cpu_ms_per_crop": 1000 * cpu / (len(times) * batch)}
    return {"backend": backend, "rows": rows, "torch_threads": torch_threads(),
            "crop_source": "BCCD VOC-test white cells, cut with each model's manifest geometry"}


def torch_classifier(name: str, threads: int):
    import torch

    from leukodiff.models.io import load_classifier

    torch.set_num_threads(threads)
    model, _ = load_classifier(name)
    model = model.eval().to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def run(batch: np.ndarray) -> Any:
        return model(torch.from_numpy(batch).contiguous(memory_format=torch.channels_last))

    return run


def ort_session(path: Path, threads: int, profile: str | None = None):
    """An onnxruntime CPU session with the benchmark's thread count (Skip when impossible)."""
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise Skip(f"onnxruntime not installed ({error})") from None
    if not path.is_file():
        raise Skip(f"{path.name} not found in {path.parent}: run `leukodiff export onnx`")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_classifier(name: str, threads: int):
    session = ort_session(weights_dir() / f"{name}.onnx", threads)
    input_name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> Any:
        return session.run(None, {input_name: batch})

    return run


# --- where the time goes ---------------------------------------------------------------------


def profile_torch(spec: dict) -> dict:
    """torch.profiler over the torch-backend pipeline: the operators that take the time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    set_torch_threads(spec["threads"])
    analyzer, _ = load_analyzer("torch", spec["threads"])
    images = load_rgb(f.image for f in bench_fields(spec["fields"], spec.get("data_root")))
    for image in images[:2]:
        analyzer(image)
    runs = cycle(images, spec["runs"])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for image in runs:
            analyzer(image)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = [{"op": e.key, "self_cpu_ms_per_field": e.self_cpu_time_total / 1000 / len(runs),
            "share": e.self_cpu_time_total / total, "calls_per_field": e.count / len(runs)}
           for e in events[:12]]
    close(analyzer)
    return {"tool": f"torch.profiler (torch {torch.__version__})", "fields": len(runs),
            "top_ops": top}


def profile_onnx(spec: dict) -> dict:
    """onnxruntime's own profiler on each shipped ONNX graph: time per operator type."""
    threads, runs = spec["threads"], spec["runs"]
    images = load_rgb(f.image for f in bench_fields(spec["fields"], spec.get("data_root")))
    out: dict[str, Any] = {"tool": "onnxruntime profiler (SessionOptions.enable_profiling)",
                           "models": {}}
    for name in ("detector", "detector.group", "mononuclear", "polymorphonuclear"):
        path = weights_dir() / f"{name}.onnx"
        if name == "detector.group" and not path.exists():
            continue  # an export without a separate group-classifier graph
        session = ort_session(path, threads, profile=str(Path(spec["tmp"]) / name))
        feeds = [_feed(session, image, crops=name != "detector") for image in images]
        for feed in cycle(feeds, 2):
            session.run(None, feed)
        for feed in cycle(feeds, runs):
            session.run(None, feed)
        trace = json.loads(Path(session.end_profiling()).read_text())
        per_op: dict[str, float] = {}
        for event in trace:
            if event.get("cat") == "Node":
                op = event.get("args", {}).get("op_name", "?")
                per_op[op] = per_op.get(op, 0.0) + event["dur"] / 1000
        ranked = sorted(per_op.items(), key=lambda kv: kv[1], reverse=True)
        total = sum(per_op.values()) or 1.0
        out["models"][name] = {
            "inputs": [f"{i.name} {i.shape}" for i in session.get_inputs()],
            "ms_per_run": total / (runs + 2),
            "top_ops": [{"op": op, "ms_per_run": ms / (runs + 2), "share": ms / total}
                        for op, ms in ranked[:8]]}
    return out


def _feed(session: Any, image: Any, crops: bool) -> dict[str, np.ndarray]:
    """An input for a shipped graph: a whole field (detector) or 4 crops of 128x128."""
    feed = {}
    for spec_input in session.get_inputs():
        shape = spec_input.shape
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        if crops:
            feed[spec_input.name] = np.ascontiguousarray(
                np.repeat(pixels[None, :, :128, :128], 4, axis=0))
        elif len(shape) == 4:
            feed[spec_input.name] = pixels[None]
        elif len(shape) == 3:
            feed[spec_input.name] = pixels
        else:
            raise Skip(f"cannot build an input for {spec_input.name} {shape}")
    return feed
