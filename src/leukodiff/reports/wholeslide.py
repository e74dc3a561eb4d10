"""A whole slide's outputs in an `analyze` run: instead of a full-size annotated image,
fields/STEM.overview.png (the slide's lowest level, at most OVERVIEW_SIDE a side, with
every cell boxed in its type's colour), STEM.json (cells in level-0 pixels, plus how the
slide was read: levels, microns per pixel and their source, windows and blocks read, the
counting area, notes) and STEM.geojson."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

from leukodiff.pipeline.analyzer import COLOURS
from leukodiff.pipeline.wholeslide import Slide, SlideResult, open_slide

OVERVIEW_SIDE = 2048


class SlideCrops:
    """A slide seen as an image that only crops (what the report's cell gallery needs):
    `crop(box)` reads that level-0 region, never the whole slide."""

    def __init__(self, slide: Slide) -> None:
        self.slide = slide

    def crop(self, box) -> Image.Image:
        x0, y0, x1, y1 = (int(v) for v in box)
        return Image.fromarray(self.slide.read(x0, y0, x1, y1))


def overview(slide: Slide, result: SlideResult) -> Image.Image:
    """The slide's thumbnail, at most OVERVIEW_SIDE a side, with each cell's box."""
    image = Image.fromarray(slide.thumbnail())
    image.thumbnail((OVERVIEW_SIDE, OVERVIEW_SIDE))
    scale_x, scale_y = image.width / slide.width, image.height / slide.height
    draw = ImageDraw.Draw(image)
    for cell in result.field.cells:
        x0, y0, x1, y1 = cell.box
        draw.rectangle((x0 * scale_x, y0 * scale_y, x1 * scale_x, y1 * scale_y),
                       outline=COLOURS[cell.label], width=2)
    return image


def write_whole_slide(out_dir: Path, stem: str, result: SlideResult, gallery) -> None:
    """fields/STEM.overview.png, STEM.json and STEM.geojson of one whole slide; its cells'
    thumbnails to `gallery` (read region by region)."""
    fields = Path(out_dir) / "fields"
    with open_slide(result.field.image) as slide:
        overview(slide, result).save(fields / f"{stem}.overview.png")
        gallery.add(SlideCrops(slide), result.field)
    (fields / f"{stem}.json").write_text(json.dumps(
        {**result.field.to_dict(), "whole_slide": result.to_dict()}, indent=2))
    (fields / f"{stem}.geojson").write_text(json.dumps(result.field.to_geojson()) + "\n")
