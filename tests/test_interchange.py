"""Outputs other tools read (issue #17, item 5): QuPath GeoJSON, COCO results, pandas, and
numpy arrays in; on real BCCD fields with the shipped models on onnxruntime."""

import json
import math
import re
import sys

import geojson
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from leukodiff.cli import app
from leukodiff.imaging import load_image
from leukodiff.pipeline import AnalysisError, Analyzer, FieldResult
from leukodiff.pipeline.analyzer import COCO_CATEGORY_IDS, COLOURS, UNIDENTIFIED, coco_categories
from leukodiff.taxonomy import CellType

# BCCD VOC test fields (never trained on): 00031 holds two white cells, 00007 one.
FIELDS = ("BloodImage_00031.jpg", "BloodImage_00007.jpg")


@pytest.fixture(scope="module")
def analyzer():
    with Analyzer.load(backend="onnx", threads=1) as analyzer:
        yield analyzer


@pytest.fixture(scope="module")
def field_paths(shared_data):
    return [shared_data / "bccd" / "BCCD" / "JPEGImages" / name for name in FIELDS]


@pytest.fixture(scope="module")
def result(analyzer, field_paths):
    result = analyzer(field_paths[0])
    assert len(result.cells) >= 2  # the tests below need more than one cell
    return result


def test_geojson_is_valid_and_in_qupath_form(result):
    collection = geojson.loads(json.dumps(result.to_geojson()))
    assert isinstance(collection, geojson.FeatureCollection)
    assert collection.is_valid, collection.errors()
    assert len(collection["features"]) == len(result.cells)
    for index, (feature, cell) in enumerate(zip(collection["features"], result.cells,
                                                strict=True), start=1):
        assert isinstance(feature, geojson.Feature) and feature.is_valid
        geometry = feature["geometry"]
        assert isinstance(geometry, geojson.Polygon)
        ring = geometry["coordinates"][0]
        assert len(geometry["coordinates"]) == 1 and len(ring) == 5 and ring[0] == ring[-1]
        xs, ys = [x for x, _ in ring], [y for _, y in ring]
        assert [min(xs), min(ys), max(xs), max(ys)] == pytest.approx(cell.box, abs=0.01)
        props = feature["properties"]
        assert props["objectType"] == "detection"
        assert props["name"] == f"{index} {cell.label}"
        classification = props["classification"]
        assert classification["name"] == cell.label
        colour = classification["color"]
        assert colour == list(COLOURS[cell.label])
        assert len(colour) == 3 and all(type(c) is int and 0 <= c <= 255 for c in colour)
        measurements = props["measurements"]  # QuPath: a flat map of names to numbers
        assert all(isinstance(v, int | float) and not isinstance(v, bool)
                   for v in measurements.values())
        assert measurements["Detection score"] == pytest.approx(cell.group_confidence, abs=1e-4)
        assert measurements["Type confidence"] == pytest.approx(cell.type_confidence, abs=1e-4)
        assert measurements["Group"] in (1, 2)
        assert props["metadata"] == {"group": str(cell.group)}
        assert "isLocked" not in props or isinstance(props["isLocked"], bool)


def test_a_field_without_cells_is_an_empty_feature_collection():
    collection = geojson.loads(json.dumps(FieldResult("empty.jpg", 640, 480).to_geojson()))
    assert collection.is_valid and collection["features"] == []


def test_coco_results_hold_the_boxes_and_fixed_categories(result):
    entries = result.to_coco(image_id=7)
    assert len(entries) == len(result.cells)
    ids = {c["id"]: c["name"] for c in coco_categories()}
    assert len(ids) == len(coco_categories()) == len(COCO_CATEGORY_IDS)
    assert {name: i for i, name in ids.items()} == COCO_CATEGORY_IDS
    assert set(ids.values()) == {*(str(t) for t in CellType), UNIDENTIFIED}
    for entry, cell in zip(entries, result.cells, strict=True):
        assert set(entry) == {"image_id", "category_id", "bbox", "score"}
        assert entry["image_id"] == 7
        assert ids[entry["category_id"]] == cell.label
        x, y, w, h = entry["bbox"]
        assert [x, y, x + w, y + h] == pytest.approx(cell.box, abs=1e-4)
        assert w > 0 and h > 0
        assert 0 < entry["score"] <= 1
        assert entry["score"] == pytest.approx(cell.group_confidence * cell.type_confidence)
    custom = {label: 100 + i for label, i in COCO_CATEGORY_IDS.items()}
    assert [e["category_id"] for e in result.to_coco(category_ids=custom)] == [
        custom[c.label] for c in result.cells]
    assert {c["id"] for c in coco_categories(custom)} == set(custom.values())


def test_to_pandas_has_one_row_per_cell(result):
    frame = result.to_pandas()
    assert len(frame) == len(result.cells)
    assert list(frame["cell"]) == list(range(1, len(result.cells) + 1))
    assert list(frame["label"]) == [c.label for c in result.cells]
    assert list(frame["group"]) == [str(c.group) for c in result.cells]
    assert frame[["x0", "y0", "x1", "y1"]].to_numpy() == pytest.approx(
        np.array([c.box for c in result.cells]))
    assert list(frame["type_confidence"]) == pytest.approx([c.type_confidence
                                                           for c in result.cells])
    for row, cell in zip(frame.itertuples(), result.cells, strict=True):
        for t in CellType:
            value = getattr(row, f"p_{t}")
            assert (math.isnan(value) if str(t) not in cell.probabilities
                    else value == pytest.approx(cell.probabilities[str(t)]))
    empty = FieldResult("empty.jpg", 640, 480).to_pandas()
    assert len(empty) == 0 and list(empty.columns) == list(frame.columns)


def test_to_pandas_without_pandas_names_the_extra(result, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas -> ImportError
    with pytest.raises(ImportError, match=re.escape("leukodiff[pandas]")):
        result.to_pandas()


def _same_cells(a: FieldResult, b: FieldResult) -> None:
    assert (a.width, a.height) == (b.width, b.height)
    assert [c.label for c in a.cells] == [c.label for c in b.cells]
    assert np.array([c.box for c in a.cells]) == pytest.approx(
        np.array([c.box for c in b.cells]), abs=1e-3)
    assert [c.type_confidence for c in a.cells] == pytest.approx(
        [c.type_confidence for c in b.cells], abs=1e-5)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_numpy_arrays_give_the_same_cells_as_pil_images(analyzer, field_paths, mode):
    image = load_image(field_paths[0]).convert(mode)
    if mode == "RGBA":  # half-transparent corner: composited over white, as for PIL
        alpha = np.full((image.height, image.width), 255, dtype=np.uint8)
        alpha[:100, :100] = 128
        image.putalpha(Image.fromarray(alpha))
    array = np.asarray(image)
    assert array.dtype == np.uint8 and array.shape[2:] == {"RGB": (3,), "L": (),
                                                           "RGBA": (4,)}[mode]
    from_array = analyzer(array, name="array")
    _same_cells(from_array, analyzer(image))
    assert from_array.image == "array"
    # a grey field: the shipped detector (trained on stained colour) finds no white cell
    # in it, through either path; the look check calls such an image unlike its labs
    assert bool(from_array.cells) == (mode != "L")
    if mode == "L":
        assert analyzer.look(image.convert("RGB"))[1]
    # a view with other strides (a crop of a larger array) works as well
    padded = np.zeros((image.height + 20, image.width + 20, *array.shape[2:]), np.uint8)
    padded[10:-10, 10:-10] = array
    _same_cells(analyzer(padded[10:-10, 10:-10]), from_array)


@pytest.mark.parametrize(("shape", "dtype", "message"), [
    ((480, 640, 2), np.uint8, "shape"),
    ((3, 480, 640), np.uint8, "shape"),  # channels first
    ((480, 640, 3, 1), np.uint8, "shape"),
    ((640,), np.uint8, "shape"),
    ((480, 640, 3), np.float32, "dtype float32"),
    ((480, 640), np.uint16, "dtype uint16"),
    ((480, 640, 3), bool, "dtype bool"),
])
def test_bad_arrays_are_refused_with_a_reason(analyzer, shape, dtype, message):
    with pytest.raises(AnalysisError, match=message) as error:
        analyzer(np.full(shape, 200, dtype=dtype))
    assert "(H, W, 3)" in str(error.value) or "uint8" in str(error.value)


def test_other_objects_are_a_type_error(analyzer):
    with pytest.raises(TypeError, match="numpy array"):
        analyzer([[0, 1], [2, 3]])


def test_analyze_writes_geojson_per_field_and_one_coco_file(tmp_path, field_paths):
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["analyze", *map(str, field_paths), "--out", str(out),
                                   "--backend", "onnx", "--threads", "1"])
    assert run.exit_code == 0, run.output
    # what analyze wrote before is still there
    for name in ("report.html", "cells.csv", "differential.json"):
        assert (out / name).is_file()
    jsons = sorted((out / "fields").glob("*.json"))
    geojsons = sorted((out / "fields").glob("*.geojson"))
    assert len(jsons) == len(geojsons) == 2 and len(list((out / "fields").glob("*.png"))) == 2
    assert [p.stem for p in jsons] == [p.stem for p in geojsons]
    cells_per_field = []
    for json_path, geojson_path in zip(jsons, geojsons, strict=True):
        field = json.loads(json_path.read_text())
        collection = geojson.loads(geojson_path.read_text())
        assert collection.is_valid
        labels = [f["properties"]["classification"]["name"] for f in collection["features"]]
        assert labels == [c["label"] for c in field["cells"]]
        cells_per_field.append(len(labels))
    assert cells_per_field[0] >= 2 and cells_per_field[1] >= 1

    coco = json.loads((out / "detections.coco.json").read_text())
    assert coco["categories"] == coco_categories()
    assert [(i["id"], i["file_name"], i["width"], i["height"]) for i in coco["images"]] == [
        (n, str(p), 640, 480) for n, p in enumerate(field_paths, start=1)]
    # image id n is the field written as fields/000n_...
    assert [int(p.stem.split("_", 1)[0]) for p in jsons] == [i["id"] for i in coco["images"]]
    annotations = coco["annotations"]
    assert len(annotations) == sum(cells_per_field)
    assert [a["id"] for a in annotations] == list(range(1, len(annotations) + 1))
    category_ids = {c["id"] for c in coco["categories"]}
    for image, json_path in zip(coco["images"], jsons, strict=True):
        field = json.loads(json_path.read_text())
        mine = [a for a in annotations if a["image_id"] == image["id"]]
        assert [a["category_id"] for a in mine] == [COCO_CATEGORY_IDS[c["label"]]
                                                    for c in field["cells"]]
        for a, cell in zip(mine, field["cells"], strict=True):
            x, y, w, h = a["bbox"]
            assert [x, y, x + w, y + h] == pytest.approx(cell["box"], abs=0.06)  # json: 0.1
            assert a["category_id"] in category_ids and a["iscrowd"] == 0
            assert a["area"] == pytest.approx(w * h) and 0 < a["score"] <= 1

    pycocotools = pytest.importorskip("pycocotools.coco")  # the [torch] extra's COCO reader
    data = pycocotools.COCO(str(out / "detections.coco.json"))
    assert len(data.getImgIds()) == 2 and len(data.getAnnIds()) == len(annotations)
    detections = data.loadRes(annotations)
    assert len(detections.getAnnIds()) == len(annotations)
