"""Saving and loading trained models: a state dict plus a JSON manifest.

The manifest says everything needed to use the weights without guessing:
architecture, classes, crop geometry, training data and split seed, the
command, held-out metrics, and the sha256 of the weights file, checked on load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from leukodiff.models.files import (
    SHIPPED_DIR,
    Manifest,
    ModelFileError,
    manifest_path,
    read_checked,
    resolve,
    sha256_of,
    shipped,
)
from leukodiff.models.mobilenet import MobileNetClassifier

__all__ = ["SHIPPED_DIR", "Manifest", "ModelFileError", "load_classifier", "load_detector",
           "read_checked", "resolve", "save_model", "sha256_of", "shipped"]


def save_model(model: torch.nn.Module, manifest: dict[str, Any], path: Path) -> dict:
    """Write `path` (.pt state dict) and its manifest beside it; returns the manifest.

    `manifest["architecture"]` must say enough to rebuild the network without
    any pretrained weights file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, path)
    manifest = {**manifest, "weights": path.name, "sha256": sha256_of(path)}
    manifest_path(path).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_classifier(model: str | Path) -> tuple[MobileNetClassifier, Manifest]:
    """A level-2 classifier in eval mode and its manifest (a path or a shipped name)."""
    path, manifest = read_checked(model)
    if manifest.name != "mobilenet_v1":
        raise ModelFileError(f"{path}: not a level-2 classifier ({manifest.name!r})")
    arch = manifest.architecture
    network = MobileNetClassifier(
        num_classes=len(manifest.classes), width=arch["width"], hidden=arch["hidden"]
    )
    network.load_state_dict(_state(path))
    return network.eval(), manifest


def load_detector(model: str | Path) -> tuple[torch.nn.Module, Manifest]:
    """The level-1 Faster R-CNN in eval mode and its manifest (a path or a shipped name)."""
    from leukodiff.models.detector import DetectorSpec, build_detector

    path, manifest = read_checked(model)
    if not manifest.is_detector:
        raise ModelFileError(f"{path}: not a detector ({manifest.name!r})")
    network = build_detector(DetectorSpec.from_dict(manifest.architecture), pretrained=False)
    network.load_state_dict(_state(path))
    return network.eval(), manifest
