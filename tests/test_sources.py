"""Readers: real counts of every shared set, generic formats on tiny fixtures, bad input."""

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from leukodiff.data.crops import cells_from_fields, load_cell_image, square_window
from leukodiff.data.records import Box
from leukodiff.data.root import (
    ENV_VAR,
    DataNotFoundError,
    data_root,
    data_roots,
    dataset_dir,
    has_dataset,
)
from leukodiff.data.sources import (
    load_cells,
    load_fields,
    read_class_folders,
    read_coco,
    read_voc,
    read_yolo,
)
from leukodiff.data.sources.chula import slide_of
from leukodiff.taxonomy import CellType, Group, ObjectKind

# ---------------------------------------------------------------- shared sets


@pytest.fixture(scope="module")
def bccd(shared_data):
    return load_fields("bccd", shared_data)


def test_bccd_fields_join_labels_box_by_box_only_when_unambiguous(bccd):
    fields = bccd.records
    assert len(fields) == 364
    shape = Counter(
        (len(f.wbc_boxes), sum(b.cell_type is not None for b in f.wbc_boxes)) for f in fields
    )
    # 341 fields with one WBC box and one label, 6 without WBC, 14 with two boxes
    assert shape[(1, 1)] == 341
    assert shape[(0, 0)] == 6
    assert sum(n for (boxes, _), n in shape.items() if boxes == 2) == 14
    # two-label fields keep their boxes, unassigned, with the labels as candidates
    unassigned = [b for f in fields for b in f.wbc_boxes if b.candidates]
    assert unassigned and all(b.cell_type is None for b in unassigned)
    mixed = [b for b in unassigned if len({str(t) for t in b.candidates}) > 1]
    assert any(b.group is None for b in mixed)  # e.g. NEUTROPHIL, LYMPHOCYTE: group unknown
    # RBC and platelet boxes are kept
    kinds = Counter(b.kind for f in fields for b in f.boxes)
    assert kinds[ObjectKind.RBC] == 4153 and kinds[ObjectKind.PLATELET] == 361


def test_bccd_exposes_voc_lists_and_reports_the_zero_size_rbc_boxes(bccd):
    assert Counter(f.subset for f in bccd.records) == {"train": 205, "val": 87, "test": 72}
    reasons = {s.path.stem: s.reason for s in bccd.skipped}
    assert set(reasons) == {"BloodImage_00338", "BloodImage_00343"}
    assert all("degenerate" in r and "RBC" in r for r in reasons.values())


def test_bccd_cells_and_crops(bccd):
    cells = cells_from_fields(bccd.records)
    counts = Counter(c.cell_type for c in cells)
    assert counts[CellType.NEUTROPHIL] == 210 and counts[CellType.EOSINOPHIL] == 86
    assert counts[CellType.LYMPHOCYTE] == 35 and counts[CellType.MONOCYTE] == 20
    cell = cells[0]
    crop = load_cell_image(cell, crop_scale=1.5)
    assert crop.size[0] == crop.size[1]  # square
    assert crop.size[0] == pytest.approx(1.5 * max(cell.box.width, cell.box.height), abs=1.5)


def test_kbc_counts_and_name_number_group_keys(shared_data):
    kbc = load_cells("kbc", shared_data)
    counts = Counter((c.subset, c.cell_type) for c in kbc.records)
    assert counts[("TRAIN", CellType.EOSINOPHIL)] == 2497
    assert counts[("TRAIN", CellType.LYMPHOCYTE)] == 2483
    assert counts[("TRAIN", CellType.MONOCYTE)] == 2478
    assert counts[("TRAIN", CellType.NEUTROPHIL)] == 2499
    assert sum(n for (subset, _), n in counts.items() if subset == "TEST_SIMPLE") == 71
    train_cells = Counter(
        (c.cell_type, c.group_key) for c in kbc.records if c.subset == "TRAIN"
    )
    per_type = Counter(t for t, _ in train_cells)
    assert per_type == {CellType.EOSINOPHIL: 75, CellType.LYMPHOCYTE: 27,
                        CellType.MONOCYTE: 16, CellType.NEUTROPHIL: 159}
    assert not kbc.skipped


def test_pbc_counts(shared_data):
    pbc = load_cells("pbc", shared_data)
    assert Counter(c.cell_type for c in pbc.records) == {
        CellType.BASOPHIL: 1218, CellType.LYMPHOCYTE: 1214, CellType.MONOCYTE: 1420,
        CellType.NEUTROPHIL: 1646, CellType.EOSINOPHIL: 1646}
    assert len({c.group_key for c in pbc.records}) == 7144


def test_bcd_rgba_tiles_with_normalised_boxes(shared_data):
    bcd = load_fields("bcd", shared_data)
    assert len(bcd) == 100
    kinds = Counter(b.kind for f in bcd.records for b in f.boxes)
    assert kinds == {ObjectKind.WBC: 103, ObjectKind.RBC: 2236}
    assert all((f.width, f.height) == (256, 256) for f in bcd.records)
    wbc = [b for f in bcd.records for b in f.wbc_boxes]
    assert all(b.cell_type is None and b.group is None for b in wbc)
    assert max(b.width for b in wbc) > 40  # pixels, not 0-1 fractions


def test_chula_fields_by_slide_with_its_quirks_reported():
    if not has_dataset("chula", None, "WBC_Samples"):
        pytest.skip("Chula is not in any data root (fetched data; see data.root.FETCHED_SETS)")
    chula = load_fields("chula")
    assert len(chula) == 486
    types = Counter(b.cell_type for f in chula.records for b in f.wbc_boxes)
    assert types == {CellType.NEUTROPHIL: 112, CellType.LYMPHOCYTE: 111,
                     CellType.BASOPHIL: 100, CellType.EOSINOPHIL: 100, CellType.MONOCYTE: 86}
    reasons = Counter(s.reason.split(" (")[0] for s in chula.skipped)
    assert reasons == {"label file without an image of its name": 12,
                       "no label file with its name in labels/": 12,
                       "horizontal mirror of M-8_0037.jpg": 1,
                       "horizontal mirror of M-8_0073.jpg": 1}
    assert all((f.width, f.height) == (1440, 900) for f in chula.records)
    assert len({f.group_key for f in chula.records}) == 29  # slides
    assert {f.group_key for f in chula.records if f.image.stem.startswith("M-8_")} == {
        "chula:M-8"}


def test_pig_fields_are_read_enlarged_with_their_boxes(pig_like_root, shared_data):
    from leukodiff.data.crops import field_image
    from leukodiff.data.sources.pig import ZOOM, read_pig

    pig = read_pig(pig_like_root / "pig")
    assert [f.subset for f in pig.records] == ["train", "test"]
    assert [(s.path.name, s.reason) for s in pig.skipped] == [
        ("valid", "folder absent: the set is not wholly extracted")]
    field = pig.records[0]
    assert field.zoom == ZOOM == 5 and (field.width, field.height) == (2080, 2080)
    (box,) = field.wbc_boxes
    assert box.group is None and box.cell_type is None  # a white cell, no type
    # centre 208, 20.8 x 26 px, all times 5
    assert (box.x0, box.y0, box.x1, box.y1) == pytest.approx((988, 975, 1092, 1105))
    assert field.group_key == "pig:100"
    assert field_image(field).size == (2080, 2080)  # read at the size its boxes are in
    plain = load_fields("bcd", shared_data).records[0]
    assert field_image(plain).size == (plain.width, plain.height)
    typed = replace(field, boxes=(replace(box, cell_type=CellType.LYMPHOCYTE),))
    (cell,) = cells_from_fields([typed])  # a cell is cut from the file as it is
    assert cell.box.xyxy == pytest.approx(tuple(v / 5 for v in box.xyxy))
    assert load_cell_image(cell, 1.0).size == (26, 26)  # a square of its longer side


def test_pig_fields_when_fetched():
    if not has_dataset("pig", None, "train/labels"):
        pytest.skip("the pig fields are not in any data root (fetched data; see "
                    "data.root.FETCHED_SETS)")
    pig = load_fields("pig")
    assert Counter(f.subset for f in pig.records) == {"train": 459, "valid": 98, "test": 98}
    assert not pig.skipped
    sizes = sorted(max(b.width, b.height) for f in pig.records for b in f.wbc_boxes)
    assert 100 < sizes[len(sizes) // 2] < 125  # ~22 px enlarged 5x: BCD's ~100 px


def test_reviewed_unboxed_white_cells_of_chula_lie_off_its_boxes():
    from leukodiff.data.sources.unboxed import unboxed_white_cells

    unboxed = unboxed_white_cells("chula")
    assert sum(map(len, unboxed.values())) == 64 and len(unboxed) == 49
    for boxes in unboxed.values():
        for box in boxes:
            assert 0 <= box.x0 < box.x1 <= 1440 and 0 <= box.y0 < box.y1 <= 900
            assert box.group is None and 60 < max(box.width, box.height) < 260
    assert unboxed_white_cells("bcd") == {}  # nobody reviewed it: nothing added
    if not has_dataset("chula", None, "WBC_Samples"):
        pytest.skip("Chula is not in any data root (fetched data; see data.root.FETCHED_SETS)")
    by_name = {f.image.stem: f for f in load_fields("chula").records}
    assert set(unboxed) <= set(by_name)
    for name, boxes in unboxed.items():  # a second cell of the field, not its boxed one
        for box in boxes:
            for boxed in by_name[name].wbc_boxes:
                overlap = max(0.0, min(box.x1, boxed.x1) - max(box.x0, boxed.x0)) * max(
                    0.0, min(box.y1, boxed.y1) - max(box.y0, boxed.y0))
                assert overlap < 0.3 * box.width * box.height


def test_slide_of_a_chula_name():
    assert slide_of(Path("M-5Bb_0026.jpg")) == "M-5Bb"
    assert slide_of(Path("HF-M-8_0037.jpg")) == "M-8"


def _yolo_line(index, box, width, height):
    cx, cy = (box.x0 + box.x1) / 2 / width, (box.y0 + box.y1) / 2 / height
    return f"{index} {cx:.6f} {cy:.6f} {box.width / width:.6f} {box.height / height:.6f}"


def test_yolo_folder_made_from_bcd_fields(tmp_path, shared_data):
    """Two real BCD fields written as YOLO (class 0 wbc, 1 rbc) read back as the same boxes;
    an image without labels, labels without an image and bad lines are reported."""
    bcd = sorted(load_fields("bcd", shared_data).records, key=lambda f: f.image.name)[:2]
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for field in bcd:
        (tmp_path / "images" / field.image.name).write_bytes(field.image.read_bytes())
        lines = [_yolo_line(0 if b.kind is ObjectKind.WBC else 1, b, field.width, field.height)
                 for b in field.boxes]
        (tmp_path / "labels" / f"{field.image.stem}.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "images" / "unlabelled.png").write_bytes(bcd[0].image.read_bytes())
    (tmp_path / "labels" / "orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with (tmp_path / "labels" / f"{bcd[1].image.stem}.txt").open("a") as handle:
        handle.write("7 0.5 0.5 0.1 0.1\n0 0.5 0.5\nx 0.5 0.5 0.1 0.1\n\n")
    loaded = read_yolo(tmp_path, ["wbc", "rbc"], source="mine")
    assert [f.image.name for f in loaded.records] == [f.image.name for f in bcd]
    for read, original in zip(loaded.records, bcd, strict=True):
        assert read.source == "mine" and read.group_key == f"mine:{original.image.stem}"
        assert [b.kind for b in read.boxes] == [b.kind for b in original.boxes]
        for a, b in zip(read.boxes, original.boxes, strict=True):
            assert a.xyxy == pytest.approx(b.xyxy, abs=0.01)
    reasons = sorted(s.reason.split(" (")[0] for s in loaded.skipped)
    extra = len(bcd[1].boxes)  # the bad lines follow the field's own boxes
    assert reasons == sorted(["label file without an image of its name",
                              f"line {extra + 1}: class 7 is not one of the 2 class names",
                              f"line {extra + 2}: 3 values, not 5",
                              f"line {extra + 3}: malformed",
                              "no label file with its name in labels/"])
    with pytest.raises(FileNotFoundError, match="images/ and labels/"):
        read_yolo(tmp_path / "images", ["wbc"])


# ---------------------------------------------------------------- data root


def test_data_root_order_and_clear_errors(tmp_path, monkeypatch, shared_data):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert data_root() == tmp_path.resolve()
    assert data_root(shared_data) == shared_data
    with pytest.raises(DataNotFoundError, match="--data-root") as info:
        data_root(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(info.value)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "gone"))
    with pytest.raises(DataNotFoundError, match="LEUKODIFF_DATA"):
        data_root()
    with pytest.raises(DataNotFoundError, match="pbc"):
        dataset_dir("pbc", tmp_path)
    with pytest.raises(DataNotFoundError, match="bccd"):
        load_fields("bccd", tmp_path)


def test_several_data_roots_and_a_fetched_set_that_is_absent(tmp_path, monkeypatch,
                                                             shared_data):
    fetched = tmp_path / "fetched"
    (fetched / "chula" / "WBC_Samples").mkdir(parents=True)
    monkeypatch.setenv(ENV_VAR, f"{shared_data}:{tmp_path / 'gone'}:{fetched}")
    assert data_roots() == [shared_data, fetched.resolve()]
    assert dataset_dir("pbc") == shared_data / "pbc"
    assert dataset_dir("chula", None, "WBC_Samples") == fetched.resolve() / "chula"
    with pytest.raises(DataNotFoundError, match="singgihbekti/WBC_Dataset"):
        dataset_dir("chula", shared_data, "WBC_Samples")
    assert not has_dataset("chula", shared_data, "WBC_Samples")


# ---------------------------------------------------------------- generic formats


def _voc_xml(filename, objects, size=(64, 48)):
    body = "".join(
        f"<object><name>{name}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for name, (x0, y0, x1, y1) in objects
    )
    return (f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width>"
            f"<height>{size[1]}</height><depth>3</depth></size>{body}</annotation>")


def test_voc_folder_as_labelimg_writes_it(tmp_path, make_image):
    make_image("voc/a.jpg")
    make_image("voc/b.png")
    (tmp_path / "voc/a.xml").write_text(_voc_xml("a.jpg", [
        ("lymphocyte", (10, 10, 30, 30)),
        ("PMN", (30, 5, 60, 40)),
        ("RBC", (0, 0, 5, 5)),
        ("RBC", (20, 20, 20, 20)),          # zero size
        ("WBC", (100, 100, 120, 120)),      # outside the 64x48 image
        ("WBC", (50, 30, 80, 60)),          # pokes out: clipped
        ("macrophage", (1, 1, 9, 9)),       # unknown label
    ]))
    (tmp_path / "voc/b.xml").write_text(_voc_xml("b.png", []))
    (tmp_path / "voc/c.xml").write_text(_voc_xml("c.jpg", [("WBC", (1, 1, 9, 9))]))  # no image
    (tmp_path / "voc/d.xml").write_text("<annotation><filename>")
    loaded = read_voc(tmp_path / "voc", source="mylab")
    fields = {f.image.name: f for f in loaded.records}
    assert set(fields) == {"a.jpg", "b.png"}
    a = fields["a.jpg"]
    assert [b.label for b in a.boxes] == ["lymphocyte", "polymorphonuclear", "rbc", "wbc"]
    assert a.boxes[1].group is Group.POLYMORPHONUCLEAR and a.boxes[1].cell_type is None
    assert a.boxes[3].xyxy == (50, 30, 64, 48)
    assert fields["b.png"].boxes == ()  # an empty field is a valid field
    reasons = sorted(s.reason for s in loaded.skipped)
    assert len(reasons) == 5
    assert any("degenerate" in r for r in reasons)
    assert any("outside" in r for r in reasons)
    assert any("macrophage" in r for r in reasons)
    assert any("image file was not found" in r for r in reasons)
    assert any("malformed XML" in r for r in reasons)


def test_voc_layout_with_annotations_and_jpegimages(tmp_path, make_image):
    make_image("set/JPEGImages/f1.jpg")
    (tmp_path / "set/Annotations").mkdir(parents=True)
    (tmp_path / "set/Annotations/f1.xml").write_text(
        _voc_xml("f1.jpg", [("EOSINOPHIL", (5, 5, 25, 25))]))
    loaded = read_voc(tmp_path / "set")
    assert [b.cell_type for b in loaded.records[0].boxes] == [CellType.EOSINOPHIL]
    assert loaded.records[0].group_key == "voc:f1"


def test_class_folders_with_bad_files(tmp_path, make_image):
    make_image("crops/Lymphocyte/1.jpg")
    make_image("crops/Lymphocyte/2.png", seed=1)
    make_image("crops/SNE/3.jpg", seed=2)
    make_image("crops/mystery/4.jpg")
    (tmp_path / "crops/SNE/.DS_Store").write_bytes(b"\x00Bud1")
    (tmp_path / "crops/SNE/notes.txt").write_text("hello")
    (tmp_path / "crops/SNE/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (tmp_path / "crops/readme.md").write_text("x")
    loaded = read_class_folders(tmp_path / "crops", source="lab")
    assert Counter(c.cell_type for c in loaded.records) == {
        CellType.LYMPHOCYTE: 2, CellType.NEUTROPHIL: 1}
    reasons = {s.path.name: s.reason for s in loaded.skipped}
    assert set(reasons) == {"mystery", ".DS_Store", "notes.txt", "broken.jpg", "readme.md"}
    assert "1 images left out" in reasons["mystery"]
    assert all(c.source == "lab" for c in loaded.records)


def test_coco_json(tmp_path, make_image):
    make_image("coco/img1.jpg")
    make_image("coco/img2.jpg", seed=3)
    (tmp_path / "coco/ann.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "img1.jpg"}, {"id": 2, "file_name": "img2.jpg"},
                   {"id": 3, "file_name": "missing.jpg"}],
        "categories": [{"id": 1, "name": "monocyte"}, {"id": 2, "name": "rbc"},
                       {"id": 3, "name": "unicorn"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [0, 0, 0, 5]},
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [1, 1, 5, 5]},
            {"id": 4, "image_id": 9, "category_id": 1, "bbox": [1, 1, 5, 5]},
        ],
    }))
    loaded = read_coco(tmp_path / "coco/ann.json")
    fields = {f.image.name: f for f in loaded.records}
    assert fields["img1.jpg"].boxes == (Box(10, 10, 30, 30, cell_type=CellType.MONOCYTE),)
    assert fields["img2.jpg"].boxes == ()
    assert len(loaded.skipped) == 4  # zero-size, unknown label, unknown image, missing file
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a COCO"):
        read_coco(tmp_path / "bad.json")


def test_square_crops_stay_inside_the_image():
    box = Box(0, 0, 20, 10)
    assert square_window(box, 2.0, (640, 480)) == (0, 0, 40, 40)  # shifted, still square
    assert square_window(Box(300, 200, 340, 240), 1.5, (640, 480)) == (290, 190, 350, 250)
    assert square_window(Box(0, 0, 100, 100), 3.0, (200, 150)) == (0, 0, 200, 150)  # clipped
    with pytest.raises(ValueError):
        square_window(box, 0, (10, 10))
