import pytest

from leukodiff.taxonomy import (
    CELL_TYPES_OF,
    GROUP_OF,
    CellType,
    Group,
    ObjectKind,
    UnknownLabelError,
    parse_cell_type,
    parse_label,
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
