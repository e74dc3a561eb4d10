"""Cell types, groups and every source's spelling of them, in one place.

Level 1 of the ML-CNN scheme sorts white cells into two groups by nuclear
shape (mononuclear / polymorphonuclear); level 2 names the cell type within
its group. Every reader, model and report takes its class names from here.
"""

from __future__ import annotations

import re
from enum import StrEnum


class CellType(StrEnum):
    """The five mature white-cell types of a manual differential."""

    LYMPHOCYTE = "lymphocyte"
    MONOCYTE = "monocyte"
    NEUTROPHIL = "neutrophil"  # segmented neutrophil
    EOSINOPHIL = "eosinophil"
    BASOPHIL = "basophil"


class Group(StrEnum):
    """Level-1 groups, by the morphology of the nucleus."""

    MONONUCLEAR = "mononuclear"
    POLYMORPHONUCLEAR = "polymorphonuclear"


class ObjectKind(StrEnum):
    """What a box in a smear field marks."""

    WBC = "wbc"
    RBC = "rbc"
    PLATELET = "platelet"


#: The level-1 detector's class index of each group (0 is Faster R-CNN's background), shared
#: by training, the torch and onnxruntime backends and evaluation.
DETECTOR_LABEL_OF: dict[Group, int] = {Group.MONONUCLEAR: 1, Group.POLYMORPHONUCLEAR: 2}
GROUP_OF_DETECTOR_LABEL: dict[int, Group] = {i: g for g, i in DETECTOR_LABEL_OF.items()}

GROUP_OF: dict[CellType, Group] = {
    CellType.LYMPHOCYTE: Group.MONONUCLEAR,
    CellType.MONOCYTE: Group.MONONUCLEAR,
    CellType.NEUTROPHIL: Group.POLYMORPHONUCLEAR,
    CellType.EOSINOPHIL: Group.POLYMORPHONUCLEAR,
    CellType.BASOPHIL: Group.POLYMORPHONUCLEAR,
}

CELL_TYPES_OF: dict[Group, tuple[CellType, ...]] = {
    group: tuple(t for t in CellType if GROUP_OF[t] is group) for group in Group
}

Label = CellType | Group | ObjectKind

#: `leukodiff adapt` refuses a type with fewer reviewed cells than this (outside the cases it
#: holds out); here, torch-free, so the review station can show how many more each type needs.
MIN_REVIEWED_PER_TYPE = 5

# Spellings seen in the shared sets (BCCD/KBC upper case, PBC folder names and
# file prefixes such as SNE_/EO_/BA_) and the usual lab abbreviations.
# Keys are normalised by `_normalise`.
_ALIASES: dict[str, Label] = {
    **{name: CellType.LYMPHOCYTE for name in ("lymphocyte", "lymph", "lym", "ly")},
    **{name: CellType.MONOCYTE for name in ("monocyte", "mono", "mo")},
    **{
        name: CellType.NEUTROPHIL
        for name in (
            "neutrophil",
            "segmented neutrophil",
            "segmented",
            "seg",
            "sne",
            "neut",
            "neu",
            "ne",
        )
    },
    **{name: CellType.EOSINOPHIL for name in ("eosinophil", "eosino", "eos", "eo")},
    **{name: CellType.BASOPHIL for name in ("basophil", "baso", "ba")},
    **{name: Group.MONONUCLEAR for name in ("mononuclear", "mn", "mononuclear cell")},
    **{
        name: Group.POLYMORPHONUCLEAR
        for name in ("polymorphonuclear", "pmn", "polymorphonuclear cell", "granulocyte")
    },
    **{
        name: ObjectKind.WBC
        for name in ("wbc", "white blood cell", "leukocyte", "leucocyte", "white cell")
    },
    **{name: ObjectKind.RBC for name in ("rbc", "red blood cell", "erythrocyte", "red cell")},
    **{name: ObjectKind.PLATELET for name in ("platelet", "plt", "thrombocyte")},
}

# Labels we recognise but deliberately do not count, with the reason.
_NOT_COUNTED: dict[str, str] = {
    "bne": "band neutrophils are not one of the five types leukodiff counts",
    "band neutrophil": "band neutrophils are not one of the five types leukodiff counts",
    "band": "band neutrophils are not one of the five types leukodiff counts",
    "ig": "immature granulocytes are not one of the five types leukodiff counts",
    "erb": "erythroblasts are not one of the five types leukodiff counts",
    "erythroblast": "erythroblasts are not one of the five types leukodiff counts",
}


class UnknownLabelError(ValueError):
    """A label that maps to none of leukodiff's classes."""


def _normalise(text: str) -> str:
    text = re.sub(r"[\s_\-]+", " ", text.strip().lower())
    if text.endswith("s") and text[:-1] in _ALIASES:  # plurals: "Platelets", "eosinophils"
        text = text[:-1]
    return text


def parse_label(text: str) -> Label:
    """Map any source's spelling of a class to a CellType, Group or ObjectKind."""
    key = _normalise(text)
    if key in _ALIASES:
        return _ALIASES[key]
    if key in _NOT_COUNTED:
        raise UnknownLabelError(f"label {text!r}: {_NOT_COUNTED[key]}")
    raise UnknownLabelError(f"unknown label {text!r}")


def parse_cell_type(text: str) -> CellType:
    """Like `parse_label`, but only a cell type is acceptable."""
    label = parse_label(text)
    if not isinstance(label, CellType):
        raise UnknownLabelError(f"label {text!r} is a {type(label).__name__}, not a cell type")
    return label
