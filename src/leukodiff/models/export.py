"""ONNX export of the trained networks, for onnxruntime (`pipeline.backends.OnnxBackend`).

Four files come from three torch models: the detector's Faster R-CNN
(torchvision's transform, RPN, RoI heads and per-class NMS, traced with a
dynamic image size), the detector's group classifier, and the two level-2
classifiers (dynamic batch). Pre- and post-processing outside the networks
(crops, agnostic NMS, tiling) is shared numpy code, so nothing is duplicated.
Each ONNX file gets a manifest: the torch manifest it came from, plus the
source file's sha256 (stale exports are refused) and its own.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leukodiff.models.files import (
    Manifest,
    manifest_path,
    onnx_paths,
    resolve,
    sha256_of,
)
from leukodiff.models.io import load_classifier, load_detector

OPSET = 17


def _export(model: nn.Module, example: Any, path: Path, inputs: list[str], outputs: list[str],
            dynamic: dict[str, dict[int, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # tracer warnings about python scalars in torchvision
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)


def _write_manifest(path: Path, manifest: Manifest, source: Path) -> None:
    """The ONNX file's manifest: its torch file's, with the format and where it came from."""
    written = {**manifest.to_dict(), "format": {"name": "onnx", "opset": OPSET,
                                       "torch": torch.__version__},
                "source": {"weights": source.name, "sha256": sha256_of(source)},
                "weights": path.name, "sha256": sha256_of(path)}
    manifest_path(path).write_text(json.dumps(written, indent=2) + "\n")


def _classifier_for_export(network: nn.Module) -> nn.Module:
    return network.eval().to(memory_format=torch.contiguous_format)


def export_detector(detector: str | Path = "detector") -> dict[str, Path]:
    """The detector's ONNX file and its group classifier's, beside `detector`'s torch file."""
    paths = onnx_paths({"detector": detector, "mononuclear": "mononuclear",
                        "polymorphonuclear": "polymorphonuclear"})
    network, manifest = load_detector(detector)
    source = resolve(detector)
    spec = network.spec
    example = [torch.rand(3, spec.min_size, spec.max_size)]
    _export(network, (example,), paths["detector"], ["image"], ["boxes", "labels", "scores"],
            {"image": {1: "height", 2: "width"}, "boxes": {0: "cells"},
             "labels": {0: "cells"}, "scores": {0: "cells"}})
    _write_manifest(paths["detector"], manifest, source)
    written = {"detector": paths["detector"]}
    group = getattr(network, "group_classifier", None)
    if group is not None:
        size = spec.group_input_size
        _export(_classifier_for_export(group), (torch.rand(2, 3, size, size),), paths["group"],
                ["images"], ["logits"], {"images": {0: "crops"}, "logits": {0: "crops"}})
        _write_manifest(paths["group"], manifest.group(), source)
        written["group"] = paths["group"]
    return written


def export_classifier(model: str | Path) -> Path:
    """A level-2 classifier's ONNX file, beside its torch file."""
    network, manifest = load_classifier(model)
    source = resolve(model)
    path = source.with_suffix(".onnx")
    size = manifest.input.size
    _export(_classifier_for_export(network), (torch.rand(2, 3, size, size),), path,
            ["images"], ["logits"], {"images": {0: "crops"}, "logits": {0: "crops"}})
    _write_manifest(path, manifest, source)
    return path


def export_onnx(detector: str | Path = "detector", mononuclear: str | Path = "mononuclear",
                polymorphonuclear: str | Path = "polymorphonuclear") -> dict[str, Path]:
    """Write the ONNX files beside the torch files; returns the path of each role."""
    return {**export_detector(detector), "mononuclear": export_classifier(mononuclear),
            "polymorphonuclear": export_classifier(polymorphonuclear)}
