"""The counting area of a whole slide: the monolayer, where a technologist counts.

A smear is thick at one end (red cells piled over one another; white cells shrunken and
hard to tell apart) and thin at the other (few red cells, white cells flattened and
broken); a differential is counted between, where red cells just touch. Each window (a
field-size block of `pipeline.wholeslide`) is placed by its red-cell coverage: the share
of its pixels darker in green than CELL_TRANSMITTANCE of the glass (one level for the
whole slide, so a window packed with cells is not split into "cells" and "overlaps" as
its own Otsu threshold would).

The band is BCCD's: its fields were photographed where technologists count, and their
coverage measured this way (each field against its own glass) is 0.30-0.50 (p5-p95,
median 0.41, all 364 fields); MONOLAYER widens that to 0.8x its p5 and 1.2x its p95.
Overlapping red cells raise it (two BCCD fields laid over one another: ~0.65, three:
~0.80); a thin area lowers it. The Otsu threshold of a BCCD field is 0.86-0.90 of its
glass (p5-p95): CELL_TRANSMITTANCE is their median.

Each window speaks for its core: the part of the slide nearer its centre than any other
window's (the overlapping windows' cores tile the slide once), measured on that part
alone (a window straddling a thick and a thin area would average to a monolayer), so
areas add up and a cell belongs to the window whose core holds its centre.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from leukodiff.pipeline.scale import cell_mask

CELL_TRANSMITTANCE = 0.88
MONOLAYER = (0.24, 0.60)
ZONES = ("monolayer", "thick", "thin", "background")  # background: skipped, no structure


def glass_level(thumbnail: np.ndarray) -> float:
    """The glass's green level on the slide: the median green of the brighter side of the
    thumbnail's Otsu split (the bare glass and the gaps between cells)."""
    from PIL import Image

    green = thumbnail[..., 1]
    brighter = green[~cell_mask(Image.fromarray(thumbnail))]
    return float(np.median(brighter)) if brighter.size else float(green.max())


def coverage(image: np.ndarray, glass: float) -> float:
    """Red-cell coverage of an RGB window: the share of pixels darker than the glass."""
    return float((image[..., 1] < CELL_TRANSMITTANCE * glass).mean())


def zone_of(cover: float) -> str:
    """Monolayer inside the MONOLAYER band, thick above it, thin below."""
    if cover > MONOLAYER[1]:
        return "thick"
    return "thin" if cover < MONOLAYER[0] else "monolayer"


@dataclass
class CountingArea:
    """Where the cells were, by zone: windows, area (level-0 pixels; mm^2 when the scale
    is known) and white cells whose centre lies there."""

    windows: dict[str, int]
    area_px: dict[str, float]
    area_mm2: dict[str, float] | None
    cells: dict[str, int]
    glass: float
    restricted: bool  # only the monolayer's cells were counted

    def to_dict(self) -> dict:
        return {"band": list(MONOLAYER), "coverage": "share of pixels darker in green than "
                f"{CELL_TRANSMITTANCE} of the glass ({self.glass:.0f})",
                "counted": "monolayer only" if self.restricted else "every zone",
                "windows": self.windows, "area_px": self.area_px, "area_mm2": self.area_mm2,
                "cells": self.cells}


class Cores:
    """The windows' cores: along each axis, midway between neighbouring window centres;
    the cores of a grid of overlapping windows tile the slide once."""

    def __init__(self, grid: Sequence[tuple[int, int]], tile: tuple[int, int],
                 size: tuple[int, int]) -> None:
        self.xs = sorted({x for x, _ in grid})
        self.ys = sorted({y for _, y in grid})
        self.bx = self._bounds(self.xs, tile[0], size[0])
        self.by = self._bounds(self.ys, tile[1], size[1])

    @staticmethod
    def _bounds(origins: Sequence[int], tile: int, length: int) -> np.ndarray:
        centres = np.asarray(origins, dtype=np.float64) + tile / 2
        return np.concatenate([[0.0], (centres[1:] + centres[:-1]) / 2, [float(length)]])

    def core(self, x: int, y: int) -> tuple[float, float, float, float]:
        """The core (x0, y0, x1, y1) of the window at origin (x, y), level-0 pixels."""
        ix, iy = self.xs.index(x), self.ys.index(y)
        return self.bx[ix], self.by[iy], self.bx[ix + 1], self.by[iy + 1]

    def window_of(self, points: np.ndarray) -> list[tuple[int, int]]:
        """The origin of the window whose core holds each (x, y) point."""
        ix = np.clip(np.searchsorted(self.bx, points[:, 0], side="right") - 1, 0,
                     len(self.xs) - 1)
        iy = np.clip(np.searchsorted(self.by, points[:, 1], side="right") - 1, 0,
                     len(self.ys) - 1)
        return [(self.xs[i], self.ys[j]) for i, j in zip(ix, iy, strict=True)]


def counting_area(zones: dict[tuple[int, int], str], cores: Cores, boxes: np.ndarray,
                  mpp: float | None, glass: float, restricted: bool
                  ) -> tuple[CountingArea, np.ndarray]:
    """The counting area of a slide whose windows' cores were placed in `zones` (by the
    window's origin; missing: background), and whether each box's centre lies in the
    monolayer."""
    windows = dict.fromkeys(ZONES, 0)
    area = dict.fromkeys(ZONES, 0.0)
    for y in cores.ys:
        for x in cores.xs:
            zone = zones.get((x, y), "background")
            x0, y0, x1, y1 = cores.core(x, y)
            windows[zone] += 1
            area[zone] += float((x1 - x0) * (y1 - y0))
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)
    where = [zones.get(origin, "background") for origin in cores.window_of(centres)]
    cells = {zone: where.count(zone) for zone in ZONES}
    mm2 = None if mpp is None else {z: a * (mpp / 1000) ** 2 for z, a in area.items()}
    inside = np.array([w == "monolayer" for w in where], dtype=bool)
    return CountingArea(windows, area, mm2, cells, glass, restricted), inside
