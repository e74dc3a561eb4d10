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


def save_classifier(model: MobileNetClassifier, manifest: dict[str, Any], path: Path) -> dict:
    """Write `path` (.pt state dict) and its manifest beside it; returns the manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, path)
    manifest = {**manifest, "weights": path.name, "sha256": sha256_of(path)}
    manifest_path(path).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_classifier(path: str | Path) -> tuple[MobileNetClassifier, dict[str, Any]]:
    """A classifier in eval mode and its manifest; refuses files that do not match it."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    if not manifest_path(path).is_file():
        raise ModelFileError(f"{path}: its manifest {manifest_path(path).name} is missing")
    manifest = json.loads(manifest_path(path).read_text())
    if manifest.get("sha256") != sha256_of(path):
        raise ModelFileError(f"{path}: sha256 does not match its manifest (file altered?)")
    arch = manifest["architecture"]
    model = MobileNetClassifier(
        num_classes=len(manifest["classes"]), width=arch["width"], hidden=arch["hidden"]
    )
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval(), manifest


def shipped(name: str) -> Path:
    """Path of a model shipped with leukodiff, e.g. `shipped("mononuclear")`."""
    return SHIPPED_DIR / f"{name}.pt"
