"""What `leukodiff analyze` writes: annotated fields, per-cell CSV, JSON, and an HTML report,
and the cells in formats other tools read (GeoJSON for QuPath, COCO detection results).

The HTML report is one self-contained file (thumbnails embedded) with the
counts, the percentages and a gallery of every cell grouped by type: the view
a technologist checks before signing a differential off.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from PIL import Image

from leukodiff.imaging import Mark, annotate
from leukodiff.pipeline.analyzer import (
    COLOURS,  # each label's colour; kept here under its old name
    UNIDENTIFIED,
    Differential,
    FieldResult,
    coco_categories,
)
from leukodiff.taxonomy import CellType

ORDER = [*(str(t) for t in CellType), UNIDENTIFIED]
CSV_COLUMNS = ["image", "cell", "x0", "y0", "x1", "y1", "group", "group_confidence", "label",
               "type_confidence"]


def field_stem(result: FieldResult, index: int) -> str:
    """A unique, filesystem-safe name for a field's outputs (never the user's path)."""
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(result.image).stem)
    return f"{index:04d}_{stem[:60]}"


def write_field(out_dir: Path, stem: str, image: Image.Image, result: FieldResult) -> None:
    """fields/STEM.png (annotated), STEM.json (every cell) and STEM.geojson (the cells as
    QuPath detections: `FieldResult.to_geojson`)."""
    marks = (Mark(cell.box, f"{index} {cell.label} {cell.type_confidence:.2f}",
                  COLOURS[cell.label]) for index, cell in enumerate(result.cells, start=1))
    # zlib level 1: 19 ms instead of 89 for a 640x480 field, 20% larger; at the default
    # level the picture cost more than the field's whole analysis (`analyze --slides`)
    annotate(image, marks).save(out_dir / "fields" / f"{stem}.png", compress_level=1)
    (out_dir / "fields" / f"{stem}.json").write_text(json.dumps(result.to_dict(), indent=2))
    (out_dir / "fields" / f"{stem}.geojson").write_text(json.dumps(result.to_geojson()) + "\n")


def coco_detections(results: Sequence[FieldResult]) -> dict:
    """Every cell of a run as one self-contained COCO file: the layout of a COCO detection
    data set ("info", "images", "categories", "annotations") whose annotations are COCO
    *results* (`FieldResult.to_coco`: image_id, category_id, bbox [x, y, w, h], score) with
    the "id", "area" and "iscrowd" a data set needs. So pycocotools' `COCO(path)` opens it,
    and `COCO.loadRes(json.load(f)["annotations"])` takes it as detections to evaluate.

    Image ids are 1, 2, ... in `results` order: the number that starts the field's name in
    fields/ (0003_... is image 3); "file_name" is the input as given; categories are
    `COCO_CATEGORY_IDS` (`coco_categories()`).
    """
    images, annotations = [], []
    for image_id, result in enumerate(results, start=1):
        images.append({"id": image_id, "file_name": result.image, "width": result.width,
                       "height": result.height})
        for entry in result.to_coco(image_id):
            annotations.append({"id": len(annotations) + 1, **entry,
                                "area": entry["bbox"][2] * entry["bbox"][3], "iscrowd": 0})
    return {"info": {"description": "leukodiff analyze: white-cell detections (COCO results)",
                     "date_created": datetime.now(UTC).isoformat(timespec="seconds")},
            "images": images, "categories": coco_categories(), "annotations": annotations}


def write_coco(path: Path, results: Sequence[FieldResult]) -> None:
    """detections.coco.json of a run (`coco_detections`)."""
    path.write_text(json.dumps(coco_detections(results), indent=1) + "\n")


def write_cells_csv(path: Path, results: Sequence[FieldResult]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for result in results:
            for index, cell in enumerate(result.cells, start=1):
                writer.writerow([result.image, index, *(f"{v:.1f}" for v in cell.box),
                                 cell.group, f"{cell.group_confidence:.4f}", cell.label,
                                 f"{cell.type_confidence:.4f}"])


def cell_thumbnail(image: Image.Image, box: Sequence[float], size: int = 96,
                   margin: float = 1.3) -> Image.Image:
    """A square view of one cell with some context (`margin` x its box), for galleries."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * margin
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    crop = image.crop((round(cx - side / 2), round(cy - side / 2),
                       round(cx + side / 2), round(cy + side / 2)))
    crop.thumbnail((size, size))
    return crop


def _thumbnail(image: Image.Image, box: Sequence[float], size: int = 96) -> str:
    crop = cell_thumbnail(image, box, size)
    buffer = io.BytesIO()
    crop.convert("RGB").save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode()


class Gallery:
    """Cell thumbnails collected field by field, so images need not stay in memory.

    A report's gallery is anything with `figures(label)`: (img src, caption, type
    confidence) per cell of that label; this one embeds each thumbnail as a data URI
    (`reports.slides` streams thumbnail files instead)."""

    def __init__(self) -> None:
        self.cells: dict[str, list[tuple[str, str, float]]] = {label: [] for label in ORDER}

    def add(self, image: Image.Image, result: FieldResult) -> None:
        for index, cell in enumerate(result.cells, start=1):
            caption = f"{Path(result.image).name} #{index}"
            self.cells[cell.label].append(
                (f"data:image/jpeg;base64,{_thumbnail(image, cell.box)}", caption,
                 cell.type_confidence))

    def figures(self, label: str) -> Iterable[tuple[str, str, float]]:
        return self.cells[label]


class _Figures(Protocol):
    def figures(self, label: str) -> Iterable[tuple[str, str, float]]: ...


def write_report(path: Path, differential: Differential, gallery: _Figures,
                 skipped: Sequence[tuple[str, str]], models: dict[str, str], *,
                 title: str = "White-cell differential", notes: Sequence[str] = ()) -> None:
    """The HTML report of one run (or one slide), written as it goes: the gallery's
    figures are read label by label, never all held at once. `notes`: paragraphs (plain
    text) after the summary, e.g. how the fields were taken."""
    rows = "".join(
        f"<tr><td><span class=dot style='background:rgb{COLOURS[label]}'></span>{label}</td>"
        f"<td>{differential.counts.get(label, 0)}</td>"
        f"<td>{'' if label == UNIDENTIFIED else f'{differential.percentages[label]:.1f}%'}"
        "</td></tr>"
        for label in ORDER)
    skipped_html = "".join(f"<li><code>{html.escape(name)}</code>: {html.escape(reason)}</li>"
                           for name, reason in skipped)
    model_html = "".join(f"<li>{html.escape(k)}: <code>{html.escape(v)}</code></li>"
                         for k, v in models.items())
    warning = (f"<p class=warning role=alert><strong>Images unlike the training labs.</strong> "
               f"{html.escape(differential.warning)}.</p>"
               if differential.warning else "")
    notes_html = "".join(f"<p class=note>{html.escape(note)}</p>" for note in notes)
    with path.open("w") as out:
        out.write(f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>leukodiff: {html.escape(title)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}}
table{{border-collapse:collapse}} td,th{{padding:.3em 1em;border-bottom:1px solid #ddd;
text-align:right}} td:first-child,th:first-child{{text-align:left}}
.dot{{display:inline-block;width:.8em;height:.8em;border-radius:50%;margin-right:.5em}}
.gallery{{display:flex;flex-wrap:wrap;gap:.5em}} figure{{margin:0;text-align:center;
font-size:.7em;width:100px}} img{{width:96px;height:96px;object-fit:contain;background:#eee}}
.warning{{background:#fff3cd;border:1px solid #e0b100;padding:.8em 1em}}
.note{{background:#eef4fb;border:1px solid #9bbbe0;padding:.6em 1em}}
</style></head><body>
<h1>{html.escape(title)}</h1>{warning}
<p>{differential.fields} field(s), {differential.total} white cells found,
{differential.identified} identified. Percentages are of identified cells;
unidentified cells (below the models' calibrated confidence) need review.
Generated {datetime.now(UTC):%Y-%m-%d %H:%M UTC} by leukodiff.</p>{notes_html}
<table><tr><th>type</th><th>count</th><th>% of identified</th></tr>{rows}</table>
<h2>Cells by type</h2>""")
        shown = 0
        for label in ORDER:
            count = differential.counts.get(label, 0)
            if not count:
                continue
            shown += 1
            out.write(f"<h3 style='color:rgb{COLOURS[label]}'>{label} ({count})</h3>"
                      "<div class=gallery>")
            for src, caption, confidence in gallery.figures(label):
                out.write(f"<figure><img src='{html.escape(src)}' alt='{html.escape(caption)}'"
                          f" loading=lazy><figcaption>{html.escape(caption)}<br>"
                          f"{confidence:.2f}</figcaption></figure>")
            out.write("</div>\n")
        if not shown:
            out.write("<p>No white cells found.</p>")
        out.write(f"""
<h2>Skipped files</h2>{f'<ul>{skipped_html}</ul>' if skipped else '<p>None.</p>'}
<h2>Models</h2><ul>{model_html}</ul>
</body></html>
""")
