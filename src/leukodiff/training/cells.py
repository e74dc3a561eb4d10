"""Cell images as one in-memory uint8 tensor, and the augmentation applied to it in training.

Decoding a JPEG costs more than a MobileNet-0.5 step at 128x128 on a CPU, so
every cell is cropped, resized and decoded once; epochs then only augment.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from leukodiff.data.crops import cell_input
from leukodiff.data.records import Cell
from leukodiff.data.scan import Track, no_progress


@dataclass(frozen=True)
class CropGeometry:
    """How a cell becomes a network input; stored in every model's manifest.

    `crop_scale`: side of the square cut around a box, in units of the box's
    longer side. 2.6 makes a cell from a field look like a PBC/KBC single-cell
    image, where the cell fills roughly the middle 40% of the frame; whole-cell
    images are centre-squared as they are.
    """

    input_size: int = 128
    crop_scale: float = 2.6
    stain: str = "none"  # imaging.STAIN_NORMALISATIONS, applied to each resized crop


def load_cell_tensors(
    cells: Sequence[Cell], geometry: CropGeometry, track: Track = no_progress
) -> torch.Tensor:
    """All cells as a (N, 3, S, S) uint8 tensor; unreadable images raise ImageError."""
    size = geometry.input_size
    out = torch.empty((len(cells), 3, size, size), dtype=torch.uint8)

    def load(index: int) -> None:
        image = cell_input(cells[index], geometry.crop_scale, size, geometry.stain)
        out[index] = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(load, i) for i in range(len(cells))]
        for future in track(futures, "Loading cell images"):
            future.result()
    return out


class CellImages:
    """Network inputs of cells, each cut and decoded once: an evaluation that adapts a
    model many times to one lab reads each of the lab's field images only once."""

    def __init__(self, geometry: CropGeometry) -> None:
        self.geometry = geometry
        self._done: dict[Cell, torch.Tensor] = {}

    def __call__(self, cells: Sequence[Cell], track: Track = no_progress) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(cells) if c not in self._done]
        if missing:
            self._done.update(zip(missing, load_cell_tensors(missing, self.geometry, track),
                                  strict=True))
        if not cells:
            size = self.geometry.input_size
            return torch.empty((0, 3, size, size), dtype=torch.uint8)
        return torch.stack([self._done[c] for c in cells])


def training_augmentation(input_size: int) -> v2.Compose:
    """What varies between smears and does not change a cell's type.

    Orientation is arbitrary on a slide (flips, 90-degree turns); framing and
    magnification vary a little (zoom-in crops); stains and lamps vary (colour
    jitter, including hue).
    """
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        RandomRot90(),
        v2.RandomResizedCrop(input_size, scale=(0.7, 1.0), ratio=(0.9, 1.11), antialias=True),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.25, hue=0.04),
    ])


# Ruifrok & Johnston's stain vectors (haematoxylin, eosin, DAB) as rows of optical density;
# the same matrix as skimage.color.rgb2hed, applied here in torch on uint8 tensors.
HED_FROM_RGB = torch.linalg.inv(torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11],
                                              [0.27, 0.57, 0.78]]))
RGB_FROM_HED = torch.linalg.inv(HED_FROM_RGB)


class StainJitter(torch.nn.Module):
    """Each stain's amount times 1 +- `scale` plus +- `shift` (in the HED space of Tellez
    et al. 2018): another lab's staining time, batch and thickness of the smear."""

    def __init__(self, scale: float = 0.25, shift: float = 0.03) -> None:
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        density = -torch.log((image.float() + 1) / 256).permute(1, 2, 0) @ HED_FROM_RGB
        alpha = 1 + self.scale * (2 * torch.rand(3) - 1)
        beta = self.shift * (2 * torch.rand(3) - 1)
        rgb = torch.exp(-((density * alpha + beta) @ RGB_FROM_HED)) * 256 - 1
        return rgb.permute(2, 0, 1).clamp(0, 255).round().to(torch.uint8)


class CameraJitter(torch.nn.Module):
    """What another microscope and camera change: white balance (each channel times
    1 +- `gain`), gamma, and with probability `soften` a lower resolution or defocus."""

    def __init__(self, gain: float = 0.12, gamma: float = 0.25, soften: float = 0.3) -> None:
        super().__init__()
        self.gain, self.gamma, self.soften = gain, gamma, soften

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.float() / 255
        x = x * (1 + self.gain * (2 * torch.rand(3, 1, 1) - 1))
        x = x.clamp(0, 1) ** float(torch.exp(self.gamma * (2 * torch.rand(()) - 1)))
        if torch.rand(()) < self.soften:
            size = x.shape[-1]
            small = max(8, round(size / (1.5 + 1.5 * float(torch.rand(())))))
            x = v2.functional.resize(v2.functional.resize(x, [small, small], antialias=True),
                                     [size, size], antialias=True)
        return (x * 255).clamp(0, 255).round().to(torch.uint8)


AUGMENTATIONS = ("basic", "lab")


def augmentation(name: str, input_size: int) -> v2.Compose:
    """"basic": `training_augmentation` (the shipped models up to issue #14); "lab": that
    plus what differs between labs: stain amounts (HED) and camera (white balance, gamma,
    resolution)."""
    if name == "basic":
        return training_augmentation(input_size)
    if name == "lab":
        return v2.Compose([*training_augmentation(input_size).transforms, StainJitter(),
                           CameraJitter()])
    raise ValueError(f"unknown augmentation {name!r}; choose one of {', '.join(AUGMENTATIONS)}")


class RandomRot90(torch.nn.Module):
    """Rotate by a random multiple of 90 degrees (exact, no interpolation)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.rot90(image, int(torch.randint(4, ())), dims=(-2, -1))


class CellTensorDataset(Dataset):
    """(float image in [0, 1], class index) pairs from a uint8 tensor, augmented on the fly."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor,
                 augment: v2.Compose | None = None) -> None:
        self.images, self.targets, self.augment = images, targets, augment

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.augment is not None:
            image = self.augment(image)
        return image.float().div_(255), self.targets[index]
