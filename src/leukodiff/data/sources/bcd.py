"""BCD (Aslan 2020): 100 RGBA 256x256 tiles from another lab, `wbc`/`rbc` boxes, no subtypes.

`annotations.csv` holds 0-1 normalised xyxy (since the source's last commit);
the pixel KITTI files in `labels/` are not used.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from leukodiff.data.records import Field, Loaded, Skipped
from leukodiff.data.scan import Track, make_box, no_progress, probe_all
from leukodiff.taxonomy import UnknownLabelError, parse_label

SOURCE = "bcd"


def read_bcd(root: Path, *, track: Track = no_progress) -> Loaded[Field]:
    loaded: Loaded[Field] = Loaded()
    table = root / "annotations.csv"
    rows: dict[str, list[dict[str, str]]] = defaultdict(list)
    with table.open(newline="") as handle:
        for row in csv.DictReader(handle):
            rows[row["image"]].append(row)
    paths = {name: root / "images" / name for name in sorted(rows)}
    infos, skipped = probe_all(list(paths.values()), track, "Checking bcd images")
    loaded.skipped.extend(skipped)
    for name, path in paths.items():
        if path not in infos:
            continue
        info = infos[path]
        boxes = []
        for index, row in enumerate(rows[name]):
            try:
                label = parse_label(row["label"])
                coords = [float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax")]
            except (UnknownLabelError, ValueError) as error:
                loaded.skipped.append(Skipped(table, f"{name} row {index}: {error}"))
                continue
            scale = (info.width, info.height, info.width, info.height)
            box = make_box([c * s for c, s in zip(coords, scale, strict=True)],
                           (info.width, info.height), label)
            if isinstance(box, str):
                loaded.skipped.append(Skipped(table, f"{name} row {index}: {box}"))
            else:
                boxes.append(box)
        loaded.records.append(
            Field(path, SOURCE, info.width, info.height, tuple(boxes),
                  f"{SOURCE}:{path.stem}", info.sha256)
        )
    unlisted = sorted(set((root / "images").glob("*")) - set(paths.values()))
    loaded.skipped.extend(Skipped(p, "image without annotations") for p in unlisted)
    return loaded
