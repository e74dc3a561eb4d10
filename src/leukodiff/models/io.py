"""Saving and loading trained models: a state dict plus a JSON manifest.

The manifest says everything needed to use the weights without guessing:
architecture, classes, crop geometry, training data and split seed, the
command, held-out metrics, and the sha256 of the weights file, checked on load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from leukodiff.models.mobilenet import MobileNetClassifier

SHIPPED_DIR = Path(__file__).parent / "weights"


class ModelFileError(ValueError):
    """A model file that is missing, altered or not one of ours."""


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


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



def shipped(name: str) -> Path:
    """Path of a model shipped with leukodiff, e.g. `shipped("mononuclear")`."""
    return SHIPPED_DIR / f"{name}.pt"


def resolve(model: str | Path) -> Path:
    """A model file's path: a path as given, or the shipped model of that name."""
    path = Path(model)
    return path if path.suffix == ".pt" or path.exists() else shipped(str(model))


def read_checked(model: str | Path) -> tuple[Path, dict[str, Any]]:
    """The model file and its manifest, refusing a missing or altered file."""
    path = resolve(model)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    if not manifest_path(path).is_file():
        raise ModelFileError(f"{path}: its manifest {manifest_path(path).name} is missing")
    manifest = json.loads(manifest_path(path).read_text())
    if manifest.get("sha256") != sha256_of(path):
        raise ModelFileError(f"{path}: sha256 does not match its manifest (file altered?)")
    return path, manifest


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_classifier(model: str | Path) -> tuple[MobileNetClassifier, dict[str, Any]]:
    """A level-2 classifier in eval mode and its manifest (a path or a shipped name)."""
    path, manifest = read_checked(model)
    arch = manifest.get("architecture", {})
    if arch.get("name") != "mobilenet_v1":
        raise ModelFileError(f"{path}: not a level-2 classifier ({arch.get('name')!r})")
    network = MobileNetClassifier(
        num_classes=len(manifest["classes"]), width=arch["width"], hidden=arch["hidden"]
    )
    network.load_state_dict(_state(path))
    return network.eval(), manifest


def load_detector(model: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The level-1 Faster R-CNN in eval mode and its manifest (a path or a shipped name)."""
    from leukodiff.models.detector import DetectorSpec, build_detector

    path, manifest = read_checked(model)
    name = str(manifest.get("architecture", {}).get("name", ""))
    if not name.startswith("fasterrcnn"):
        raise ModelFileError(f"{path}: not a detector ({name!r})")
    network = build_detector(DetectorSpec.from_dict(manifest["architecture"]), pretrained=False)
    network.load_state_dict(_state(path))
    return network.eval(), manifest
