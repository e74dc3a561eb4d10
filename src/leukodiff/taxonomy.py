"""Cell types, groups and every source's spelling of them, in one place.

Level 1 of the ML-CNN scheme sorts white cells into two groups by nuclear
shape (mononuclear / polymorphonuclear); level 2 names the cell type within
its group. Every reader, model and report takes its class names from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
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


# --- The review station's classes -----------------------------------------------------------
# The models predict the five `CellType`s; a reviewer may assign any class below. This one
# registry names them, gives each its key and colour (served to the review page, never copied
# into its script or style sheet) and says how it is counted.


class Counting(StrEnum):
    """How the cells of a class enter a differential (lab convention)."""

    DIFFERENTIAL = "differential"  # a white cell: in the WBC count, with its share of it (%)
    UNCLASSIFIED = "unclassified"  # a white cell of unknown type: in the WBC count, no share
    PER_100_WBC = "per_100_wbc"  # not a white cell (NRBC): reported per 100 WBC, not in them
    APART = "apart"  # reported apart (smudge): a count and per 100 WBC, not in the differential
    NOT_COUNTED = "not_counted"  # not counted at all (artefacts, objects that are not cells)

    @property
    def white_cell(self) -> bool:
        """In the WBC count: what the target, sign-off and percentages count."""
        return self in (Counting.DIFFERENTIAL, Counting.UNCLASSIFIED)

    @property
    def per_100_wbc(self) -> bool:
        """Reported as a count and per 100 counted white cells, outside the WBC count."""
        return self in (Counting.PER_100_WBC, Counting.APART)


@dataclass(frozen=True)
class ReviewClass:
    """A label a reviewed cell may carry: stored name, title shown, key, colour, counting."""

    name: str  # stored in the database and exports; never renamed
    title: str
    key: str  # the review page's keyboard shortcut (one character, lower case)
    colour: str  # "#rrggbb"
    counting: Counting

    @property
    def model_type(self) -> bool:
        """One of the five types the models predict (and `leukodiff adapt` learns)."""
        return self.name in _MODEL_TYPES

    @property
    def rgb(self) -> tuple[int, int, int]:
        return tuple(int(self.colour[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, str | bool]:
        return {"name": self.name, "title": self.title, "key": self.key,
                "colour": self.colour, "counting": str(self.counting),
                "model_type": self.model_type}


_MODEL_TYPES = frozenset(str(t) for t in CellType)
UNIDENTIFIED = "unidentified"
NOT_WBC = "not_wbc"
_D, _U = Counting.DIFFERENTIAL, Counting.UNCLASSIFIED

#: Every class, in display order (gallery groups, differential rows, the keys card). Keys
#: 1-5 and U / X are the station's first ones; the page also uses J, K, B, Enter, Delete,
#: Backspace, Escape, the arrows, [ ], + - =, F, E, Z and ?, which no class may take.
REVIEW_CLASSES: tuple[ReviewClass, ...] = (
    ReviewClass(CellType.LYMPHOCYTE.value, "lymphocyte", "1", "#1f77b4", _D),
    ReviewClass(CellType.MONOCYTE.value, "monocyte", "2", "#2ca02c", _D),
    ReviewClass(CellType.NEUTROPHIL.value, "neutrophil", "3", "#ff7f0e", _D),
    ReviewClass(CellType.EOSINOPHIL.value, "eosinophil", "4", "#d62728", _D),
    ReviewClass(CellType.BASOPHIL.value, "basophil", "5", "#9467bd", _D),
    ReviewClass("band_neutrophil", "band neutrophil", "6", "#8c564b", _D),
    # metamyelocytes, myelocytes and promyelocytes together, as most differentials report them
    ReviewClass("immature_granulocyte", "immature granulocyte", "7", "#556b2f", _D),
    ReviewClass("blast", "blast", "8", "#c2185b", _D),
    ReviewClass("reactive_lymphocyte", "reactive lymphocyte", "9", "#00838f", _D),
    ReviewClass("plasma_cell", "plasma cell", "0", "#393b79", _D),
    ReviewClass(UNIDENTIFIED, "unidentified", "u", "#7f7f7f", _U),
    ReviewClass("nucleated_red_cell", "nucleated red cell", "n", "#800000",
                Counting.PER_100_WBC),
    ReviewClass("smudge_cell", "smudge cell", "s", "#708090", Counting.APART),
    ReviewClass("artefact", "artefact", "a", "#b8860b", Counting.NOT_COUNTED),
    ReviewClass(NOT_WBC, "not a white cell", "x", "#333333", Counting.NOT_COUNTED),
)
REVIEW_CLASS: dict[str, ReviewClass] = {c.name: c for c in REVIEW_CLASSES}
#: Every label a reviewed cell may carry, in display order.
REVIEW_LABELS: tuple[str, ...] = tuple(REVIEW_CLASS)
#: The review page's keys that are not class keys (navigation, confirm, delete, draw).
RESERVED_KEYS = frozenset({"j", "k", "b", "enter", "delete", "backspace", "escape",
                           "arrowleft", "arrowright", "arrowup", "arrowdown", "?", "z", " ",
                           # next / previous unreviewed, zoom in / out, fit, enlarge
                           "]", "[", "+", "=", "-", "f", "e"})


#: What each kind of counting means, as the review page heads its differential rows.
COUNTING_NOTES: dict[Counting, str] = {
    Counting.DIFFERENTIAL: "white cells (% of WBC)",
    Counting.UNCLASSIFIED: "white cells of unknown type (in the WBC count, no %)",
    Counting.PER_100_WBC: "not white cells (per 100 WBC, not in the count)",
    Counting.APART: "reported apart (per 100 WBC, not in the count)",
    Counting.NOT_COUNTED: "not counted",
}


def review_taxonomy() -> dict[str, object]:
    """What the review page builds its keys, rows, gallery groups and colours from."""
    return {"classes": [c.to_dict() for c in REVIEW_CLASSES],
            "counting": {str(k): v for k, v in COUNTING_NOTES.items()}}
