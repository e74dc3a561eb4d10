import re

import pytest

from leukodiff.pipeline.analyzer import COLOURS
from leukodiff.taxonomy import (
    CELL_TYPES_OF,
    GROUP_OF,
    RESERVED_KEYS,
    REVIEW_CLASS,
    REVIEW_CLASSES,
    CellType,
    Counting,
    Group,
    ObjectKind,
    UnknownLabelError,
    parse_cell_type,
    parse_label,
    review_taxonomy,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("NEUTROPHIL", CellType.NEUTROPHIL),
        ("SNE", CellType.NEUTROPHIL),
        ("neutrophil", CellType.NEUTROPHIL),
        ("Segmented neutrophils", CellType.NEUTROPHIL),
        ("EOSINOPHIL", CellType.EOSINOPHIL),
        ("eo", CellType.EOSINOPHIL),
        ("LYMPHOCYTE", CellType.LYMPHOCYTE),
        ("MONOCYTE", CellType.MONOCYTE),
        ("basophil", CellType.BASOPHIL),
        ("BA", CellType.BASOPHIL),
        ("WBC", ObjectKind.WBC),
        ("RBC", ObjectKind.RBC),
        ("Platelets", ObjectKind.PLATELET),
        ("PMN", Group.POLYMORPHONUCLEAR),
        ("mononuclear", Group.MONONUCLEAR),
        ("  lymph  ", CellType.LYMPHOCYTE),
    ],
)
def test_every_source_spelling_maps_to_one_class(text, expected):
    assert parse_label(text) is expected


def test_groups_follow_the_paper_and_basophils_join_the_polymorphonuclear_group():
    assert CELL_TYPES_OF[Group.MONONUCLEAR] == (CellType.LYMPHOCYTE, CellType.MONOCYTE)
    assert set(CELL_TYPES_OF[Group.POLYMORPHONUCLEAR]) == {
        CellType.NEUTROPHIL, CellType.EOSINOPHIL, CellType.BASOPHIL}
    assert set(GROUP_OF) == set(CellType)


@pytest.mark.parametrize("text", ["", "banana", "BNE", "band neutrophil", "IG"])
def test_unknown_or_uncounted_labels_raise_a_clear_error(text):
    with pytest.raises(UnknownLabelError, match=repr(text)):
        parse_label(text)


def test_a_cell_type_is_required_where_only_types_make_sense():
    with pytest.raises(UnknownLabelError, match="not a cell type"):
        parse_cell_type("RBC")


@pytest.mark.parametrize("text", ["band_neutrophil", "blast", "smudge cell", "nucleated red cell",
                                  "plasma_cell", "artefact", "not_wbc", "unidentified"])
def test_review_only_classes_stay_out_of_the_data_readers(text):
    """The station's extra classes are for reviewers: `parse_label` (every data reader's
    way in) still refuses them, so no training set is read with a band or a blast."""
    with pytest.raises(UnknownLabelError):
        parse_label(text)


def test_review_classes_have_unique_names_keys_and_colours():
    names = [c.name for c in REVIEW_CLASSES]
    keys = [c.key for c in REVIEW_CLASSES]
    colours = [c.colour.lower() for c in REVIEW_CLASSES]
    assert len(set(names)) == len(names) == 15
    assert len(set(keys)) == len(keys) and len(set(colours)) == len(colours)
    for c in REVIEW_CLASSES:
        assert len(c.key) == 1 and c.key == c.key.lower() and c.key not in RESERVED_KEYS
        assert re.fullmatch(r"#[0-9a-f]{6}", c.colour), c
        assert c.title and c.name == c.name.lower()
    # The first keys stay where reviewers' fingers know them.
    assert [REVIEW_CLASS[str(t)].key for t in CellType] == ["1", "2", "3", "4", "5"]
    assert REVIEW_CLASS["unidentified"].key == "u" and REVIEW_CLASS["not_wbc"].key == "x"


def test_the_five_model_types_and_the_counting_rules():
    assert [c.name for c in REVIEW_CLASSES if c.model_type] == [str(t) for t in CellType]
    counting = {c.name: c.counting for c in REVIEW_CLASSES}
    assert {n for n, k in counting.items() if k is Counting.DIFFERENTIAL} == {
        *(str(t) for t in CellType), "band_neutrophil", "immature_granulocyte", "blast",
        "reactive_lymphocyte", "plasma_cell"}
    assert counting["unidentified"] is Counting.UNCLASSIFIED
    assert counting["nucleated_red_cell"] is Counting.PER_100_WBC
    assert counting["smudge_cell"] is Counting.APART
    assert counting["artefact"] is counting["not_wbc"] is Counting.NOT_COUNTED
    white = {n for n, k in counting.items() if k.white_cell}
    assert "blast" in white and "unidentified" in white
    assert not white & {"nucleated_red_cell", "smudge_cell", "artefact", "not_wbc"}
    assert {n for n, k in counting.items() if k.per_100_wbc} == {"nucleated_red_cell",
                                                                  "smudge_cell"}


def test_drawn_colours_come_from_the_registry():
    expected = {name: REVIEW_CLASS[name].rgb for name in [*map(str, CellType), "unidentified"]}
    assert expected == COLOURS
    assert COLOURS["lymphocyte"] == (31, 119, 180)
    served = review_taxonomy()
    assert [c["name"] for c in served["classes"]] == [c.name for c in REVIEW_CLASSES]
    assert set(served["counting"]) == {str(k) for k in Counting}
