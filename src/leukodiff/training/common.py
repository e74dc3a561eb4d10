"""What every training loop here shares: seeding, the learning-rate shape, checkpoints."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over `warmup` steps, then cosine decay to zero.

    Full-network Adam at lr 1e-3 from ImageNet weights can collapse to a
    constant output in its first steps; the warm-up prevents that.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, generator: torch.Generator, state: dict,
                    config: dict) -> None:
    """Everything needed to resume, written atomically so a kill never leaves half a file."""
    partial = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(), "state": state, "config": config}, partial)
    partial.replace(path)


def resume_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      scheduler: Any, generator: torch.Generator, config: dict,
                      error: Callable[[str], Exception]) -> dict:
    """Restore a run from `save_checkpoint`; refuses one made with another configuration."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if checkpoint["config"] != config:
        raise error(f"{path} was made with another configuration")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    generator.set_state(checkpoint["generator"])
    torch.set_rng_state(checkpoint["torch_rng"])
    return checkpoint["state"]
