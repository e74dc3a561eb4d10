"""Readers for the formats users bring their own data in.

- a class-per-folder tree of single-cell crops (`root/<cell type>/*.jpg`),
- a Pascal VOC folder, as LabelImg writes it (the paper's specialist used it),
- a COCO detection JSON,
- a YOLO folder (`images/` + `labels/`, one `class cx cy w h` line per box).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path

from leukodiff.data.records import Box, Cell, Field, Loaded, Skipped
from leukodiff.data.scan import Track, list_files, make_box, no_progress, probe_all
from leukodiff.taxonomy import UnknownLabelError, parse_cell_type, parse_label


def read_class_folders(
    root: Path,
    *,
    source: str = "folder",
    subset: str | None = None,
    group_key: Callable[[Path], str] | None = None,
    track: Track = no_progress,
) -> Loaded[Cell]:
    """Single-cell images in one folder per cell type; the folder name is the label.

    `group_key(path)` names the physical cell an image shows; by default each
    image is its own cell.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder of class folders")
    loaded: Loaded[Cell] = Loaded()
    labelled: list[tuple[Path, object]] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images, skipped = list_files(folder)
        loaded.skipped.extend(skipped)
        try:
            cell_type = parse_cell_type(folder.name)
        except UnknownLabelError as error:
            loaded.skipped.append(Skipped(folder, f"{error}; {len(images)} images left out"))
            continue
        labelled.extend((path, cell_type) for path in images)
    for path in sorted(p for p in root.iterdir() if not p.is_dir()):
        loaded.skipped.append(Skipped(path, "file outside any class folder"))

    infos, skipped = probe_all([p for p, _ in labelled], track, f"Checking {source} images")
    loaded.skipped.extend(skipped)
    key = group_key or (lambda p: f"{source}:{p.relative_to(root).as_posix()}")
    for path, cell_type in labelled:
        if path in infos:
            loaded.records.append(
                Cell(path, source, cell_type, key(path), infos[path].sha256, subset=subset)
            )
    return loaded


def _voc_image_path(xml_path: Path, filename: str, folder: Path) -> Path | None:
    name = Path(filename).name
    candidates = [
        xml_path.parent / name,
        folder / "JPEGImages" / name,
        folder / name,
        *(xml_path.with_suffix(s) for s in (".jpg", ".jpeg", ".png", ".bmp", ".tif")),
    ]
    return next((c for c in candidates if c.is_file()), None)


def _voc_annotations(folder: Path) -> list[Path]:
    annotations = folder / "Annotations"
    return sorted((annotations if annotations.is_dir() else folder).glob("*.xml"))


def read_voc(
    folder: Path,
    *,
    source: str = "voc",
    names: list[str] | None = None,
    track: Track = no_progress,
) -> Loaded[Field]:
    """Pascal VOC fields: `folder/Annotations/*.xml` + `folder/JPEGImages`, or XML beside images.

    Object names go through the taxonomy ("WBC", "RBC", "Platelets", a cell type
    or a group). `names` restricts reading to those annotation stems.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such VOC folder")
    loaded: Loaded[Field] = Loaded()
    parsed: list[tuple[Path, Path, list[tuple[int, str, list[float]]]]] = []
    xml_paths = _voc_annotations(folder)
    if names is not None:
        wanted = set(names)
        xml_paths = [p for p in xml_paths if p.stem in wanted]
    for xml_path in xml_paths:
        try:
            root = ET.parse(xml_path).getroot()
        except ET.ParseError as error:
            loaded.skipped.append(Skipped(xml_path, f"malformed XML ({error})"))
            continue
        image_path = _voc_image_path(xml_path, root.findtext("filename", ""), folder)
        if image_path is None:
            loaded.skipped.append(Skipped(xml_path, "its image file was not found"))
            continue
        objects = []
        for index, obj in enumerate(root.iter("object")):
            bndbox = obj.find("bndbox")
            try:
                coords = [float(bndbox.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            except (AttributeError, TypeError, ValueError):
                loaded.skipped.append(Skipped(xml_path, f"object {index}: missing coordinates"))
                continue
            objects.append((index, obj.findtext("name", "").strip(), coords))
        parsed.append((xml_path, image_path, objects))

    infos, skipped = probe_all([p for _, p, _ in parsed], track, f"Checking {source} images")
    loaded.skipped.extend(skipped)
    for xml_path, image_path, objects in parsed:
        if image_path not in infos:
            continue
        info = infos[image_path]
        boxes = _boxes(objects, (info.width, info.height), xml_path, loaded.skipped)
        loaded.records.append(
            Field(
                image=image_path,
                source=source,
                width=info.width,
                height=info.height,
                boxes=tuple(boxes),
                group_key=f"{source}:{xml_path.stem}",
                sha256=info.sha256,
            )
        )
    return loaded


def _boxes(
    objects: list[tuple[int, str, list[float]]],
    size: tuple[int, int],
    where: Path,
    skipped: list[Skipped],
) -> list[Box]:
    boxes = []
    for index, name, coords in objects:
        try:
            label = parse_label(name)
        except UnknownLabelError as error:
            skipped.append(Skipped(where, f"object {index}: {error}"))
            continue
        box = make_box(coords, size, label)
        if isinstance(box, str):
            skipped.append(Skipped(where, f"object {index} ({name}): {box}"))
        else:
            boxes.append(box)
    return boxes


def read_coco(
    annotation_file: Path,
    images_dir: Path | None = None,
    *,
    source: str = "coco",
    track: Track = no_progress,
) -> Loaded[Field]:
    """COCO detection JSON (`bbox` = x, y, width, height); category names via the taxonomy."""
    annotation_file = Path(annotation_file)
    images_dir = Path(images_dir) if images_dir else annotation_file.parent
    try:
        coco = json.loads(annotation_file.read_text())
        images = {img["id"]: img for img in coco["images"]}
        categories = {cat["id"]: cat["name"] for cat in coco["categories"]}
        annotations = coco.get("annotations", [])
    except FileNotFoundError:
        raise FileNotFoundError(f"{annotation_file}: no such COCO file") from None
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{annotation_file}: not a COCO detection file ({error})") from None

    loaded: Loaded[Field] = Loaded()
    objects: dict[int, list[tuple[int, str, list[float]]]] = {i: [] for i in images}
    for ann in annotations:
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
            image_id = ann["image_id"]
            name = categories[ann["category_id"]]
        except (KeyError, TypeError, ValueError) as error:
            loaded.skipped.append(
                Skipped(annotation_file, f"annotation {ann.get('id')}: malformed ({error})")
            )
            continue
        if image_id not in objects:
            loaded.skipped.append(
                Skipped(annotation_file, f"annotation {ann.get('id')}: unknown image {image_id}")
            )
            continue
        index = ann.get("id", len(objects[image_id]))
        objects[image_id].append((index, name, [x, y, x + w, y + h]))

    paths = {i: images_dir / img["file_name"] for i, img in images.items()}
    infos, skipped = probe_all(list(paths.values()), track, f"Checking {source} images")
    loaded.skipped.extend(skipped)
    for image_id, path in paths.items():
        if path not in infos:
            continue
        info = infos[path]
        boxes = _boxes(objects[image_id], (info.width, info.height), path, loaded.skipped)
        loaded.records.append(
            Field(path, source, info.width, info.height, tuple(boxes),
                  f"{source}:{Path(images[image_id]['file_name']).as_posix()}", info.sha256)
        )
    return loaded


def _yolo_objects(label_file: Path, class_names: Sequence[str], size: tuple[int, int],
                  skipped: list[Skipped]) -> list[tuple[int, str, list[float]]]:
    """(index, class name, pixel xyxy) of each well-formed line of a YOLO label file."""
    width, height = size
    objects = []
    for number, line in enumerate(label_file.read_text().splitlines(), start=1):
        values = line.split()
        if not values:
            continue
        if len(values) != 5:
            skipped.append(Skipped(label_file, f"line {number}: {len(values)} values, not 5 "
                                               "(class cx cy w h)"))
            continue
        try:
            index, (cx, cy, w, h) = int(values[0]), (float(v) for v in values[1:])
        except ValueError as error:
            skipped.append(Skipped(label_file, f"line {number}: malformed ({error})"))
            continue
        if not 0 <= index < len(class_names):
            skipped.append(Skipped(label_file, f"line {number}: class {index} is not one of "
                                               f"the {len(class_names)} class names"))
            continue
        name = class_names[index]
        objects.append((number, name, [(cx - w / 2) * width, (cy - h / 2) * height,
                                       (cx + w / 2) * width, (cy + h / 2) * height]))
    return objects


def read_yolo(
    folder: Path,
    class_names: Sequence[str],
    *,
    source: str = "yolo",
    group_key: Callable[[Path], str] | None = None,
    track: Track = no_progress,
) -> Loaded[Field]:
    """YOLO fields: `folder/images/*.jpg` with `folder/labels/<same stem>.txt`.

    Each label line is `class cx cy w h`, normalised to the image's size; `class_names[i]`
    names class `i` (through the taxonomy). An image without a label file is skipped
    with that reason rather than taken as a field with no cells (an empty label file
    is such a field); a label file without an image is reported too. `group_key(path)`
    names the slide or field an image comes from (default: the image itself).
    """
    folder = Path(folder)
    images_dir, labels_dir = folder / "images", folder / "labels"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise FileNotFoundError(f"{folder}: not a YOLO folder (needs images/ and labels/)")
    loaded: Loaded[Field] = Loaded()
    images, skipped = list_files(images_dir)
    loaded.skipped.extend(skipped)
    stems = {p.stem for p in images}
    for label_file in sorted(labels_dir.glob("*.txt")):
        if label_file.stem not in stems:
            loaded.skipped.append(Skipped(label_file, "label file without an image of its name"))
    labelled = [p for p in images if (labels_dir / f"{p.stem}.txt").is_file()]
    loaded.skipped.extend(Skipped(p, "no label file with its name in labels/ (not taken as "
                                     "a field without cells)")
                          for p in images if p not in labelled)
    infos, skipped = probe_all(labelled, track, f"Checking {source} images")
    loaded.skipped.extend(skipped)
    key = group_key or (lambda p: f"{source}:{p.stem}")
    for path in labelled:
        if path not in infos:
            continue
        info = infos[path]
        label_file = labels_dir / f"{path.stem}.txt"
        objects = _yolo_objects(label_file, class_names, (info.width, info.height),
                                loaded.skipped)
        boxes = _boxes(objects, (info.width, info.height), label_file, loaded.skipped)
        loaded.records.append(Field(path, source, info.width, info.height, tuple(boxes),
                                    key(path), info.sha256))
    return loaded
