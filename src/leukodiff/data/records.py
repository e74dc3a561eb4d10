"""The two record kinds every reader produces: a smear *field* and a single *cell*.

Records are light (paths and boxes, no pixels) so a whole data set fits in a
list. Each carries its `source` and a `group_key` naming the physical cell or
field it came from: copies that share a key must stay on one side of a split.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Generic, TypeVar

from leukodiff.taxonomy import GROUP_OF, CellType, Group, ObjectKind


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixels (x0, y0) inclusive to (x1, y1) exclusive.

    For a white cell, `cell_type` is set when the source says which one; `group`
    follows from it, or is set alone when only the group is known (e.g. a BCCD
    field whose two labels are both polymorphonuclear). `candidates` keeps the
    labels of a field that could not be assigned box by box.
    """

    x0: float
    y0: float
    x1: float
    y1: float
    kind: ObjectKind = ObjectKind.WBC
    cell_type: CellType | None = None
    group: Group | None = None
    candidates: tuple[CellType, ...] = ()

    def __post_init__(self) -> None:
        if self.cell_type is not None:
            group = GROUP_OF[self.cell_type]
            if self.group is not None and self.group is not group:
                raise ValueError(f"{self.cell_type} is not {self.group}")
            object.__setattr__(self, "group", group)
        if (self.cell_type or self.group) and self.kind is not ObjectKind.WBC:
            raise ValueError(f"a {self.kind} box cannot have a white-cell type")

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)

    def scaled(self, factor: float) -> Box:
        """The same box in an image `factor` times the size."""
        return replace(self, x0=self.x0 * factor, y0=self.y0 * factor, x1=self.x1 * factor,
                       y1=self.y1 * factor)

    @property
    def label(self) -> str:
        """The most specific name known: cell type, else group, else object kind."""
        return str(self.cell_type or self.group or self.kind)


@dataclass(frozen=True)
class Field:
    """A smear image with boxes around its cells."""

    image: Path
    source: str
    width: int
    height: int
    boxes: tuple[Box, ...]
    group_key: str
    sha256: str
    subset: str | None = None  # the source's own split, e.g. BCCD's VOC "train"/"val"/"test"
    # > 1: the image is read enlarged by this factor (`data.crops.field_image`); width,
    # height and boxes are given at that size. For a set photographed at a fifth of the
    # other labs' scale (the pig fields), so its cells meet the detector at their size.
    zoom: float = 1.0

    def in_file(self, box: Box) -> Box:
        """One of this field's boxes in its image file's own pixels (a Cell is cut from
        the file as it is)."""
        return box if self.zoom == 1.0 else box.scaled(1 / self.zoom)

    @property
    def wbc_boxes(self) -> tuple[Box, ...]:
        return tuple(b for b in self.boxes if b.kind is ObjectKind.WBC)


@dataclass(frozen=True)
class Cell:
    """One white cell with its type: a whole single-cell image, or a box in a field."""

    image: Path
    source: str
    cell_type: CellType
    group_key: str
    sha256: str
    box: Box | None = None  # None: the whole image is the cell crop
    subset: str | None = None

    @property
    def group(self) -> Group:
        return GROUP_OF[self.cell_type]


@dataclass(frozen=True)
class Skipped:
    """Something a reader left out, and why (shown to the user, never dropped silently)."""

    path: Path
    reason: str


R = TypeVar("R", Field, Cell)


@dataclass
class Loaded(Generic[R]):
    """What a reader returns: the records it could use and what it skipped."""

    records: list[R] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def extend(self, other: Loaded[R]) -> Loaded[R]:
        self.records.extend(other.records)
        self.skipped.extend(other.skipped)
        return self
