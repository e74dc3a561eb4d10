"""Seeded, reproducible splits that never leak a cell across train and test.

Three protocols:
- `monte_carlo(..., grouped=False)`: the paper's random 70/30 split, repeated.
  Only exact-duplicate images are kept together.
- `monte_carlo(..., grouped=True)`: the same, but whole groups (one physical
  cell or field and all its augmented copies) go to one side: the honest figure.
- `leave_one_source_out`: train on every source but one, test on that one.

Every split is stratified by class: each class keeps close to the train
fraction on each side.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from leukodiff.data.records import Cell, Field

Record = TypeVar("Record", Cell, Field)


@dataclass(frozen=True)
class Split:
    name: str
    train: tuple[int, ...]  # indices into the record list
    test: tuple[int, ...]


def content_key(record: Cell | Field) -> tuple:
    """Same bytes and same box: the same example, whatever its path or source."""
    box = getattr(record, "box", None)
    return (record.sha256, box.xyxy if box is not None else None)


def find_duplicates(records: Sequence[Cell | Field]) -> list[list[int]]:
    """Index lists of records that are exact copies of each other (by content hash)."""
    by_content: dict[tuple, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        by_content[content_key(record)].append(index)
    return [indices for indices in by_content.values() if len(indices) > 1]


def connected_components(n: int, links: Iterable[Sequence[int]]) -> list[int]:
    """Union-find over items 0..n-1: each link joins all its members into one component.
    Returns each item's component as the index of its root; only which items share a
    root is meaningful (the roots fix the order `monte_carlo` draws units in)."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for members in links:
        for other in members[1:]:
            parent[find(other)] = find(members[0])
    return [find(i) for i in range(n)]


def split_units(records: Sequence[Cell | Field], grouped: bool) -> list[int]:
    """Which indivisible unit each record belongs to.

    Exact duplicates always share a unit; with `grouped`, so do records sharing
    a group key (and, transitively, the duplicates of any of them).
    """
    links = find_duplicates(records)
    if grouped:
        by_group: dict[str, list[int]] = defaultdict(list)
        for index, record in enumerate(records):
            by_group[record.group_key].append(index)
        links += list(by_group.values())
    return connected_components(len(records), links)


def record_label(record: Cell | Field) -> str:
    """The class a record is stratified by: its cell type, or a field's first WBC label."""
    if isinstance(record, Cell):
        return str(record.cell_type)
    labels = sorted(b.label for b in record.wbc_boxes)
    return labels[0] if labels else "no wbc"


def _stratified_unit_split(
    units: list[int], labels: Sequence[str], train_fraction: float, rng: np.random.Generator
) -> tuple[list[int], list[int]]:
    members: dict[int, list[int]] = defaultdict(list)
    for index, unit in enumerate(units):
        members[unit].append(index)
    # A unit goes with its most common label (units are nearly always one class).
    strata: dict[str, list[int]] = defaultdict(list)
    for unit, indices in members.items():
        label = Counter(labels[i] for i in indices).most_common(1)[0][0]
        strata[label].append(unit)
    train: list[int] = []
    test: list[int] = []
    for label in sorted(strata):
        stratum = sorted(strata[label])
        order = rng.permutation(len(stratum))
        sizes = np.array([len(members[stratum[i]]) for i in order])
        target = train_fraction * sizes.sum()
        cumulative = np.cumsum(sizes)
        # cut where the train side comes closest to its target share
        cut = int(np.argmin(np.abs(np.concatenate([[0], cumulative]) - target)))
        for position, i in enumerate(order):
            (train if position < cut else test).extend(members[stratum[i]])
    return sorted(train), sorted(test)


def monte_carlo(
    records: Sequence[Cell | Field],
    *,
    repeats: int = 10,
    train_fraction: float = 0.7,
    seed: int = 0,
    grouped: bool = False,
) -> list[Split]:
    """`repeats` stratified random train/test splits (the paper: 10 x 70/30)."""
    if not 0 < train_fraction < 1:
        raise ValueError(f"train fraction must be between 0 and 1, got {train_fraction}")
    units = split_units(records, grouped)
    labels = [record_label(r) for r in records]
    rng = np.random.default_rng(seed)
    kind = "grouped" if grouped else "random"
    splits = []
    for repeat in range(repeats):
        train, test = _stratified_unit_split(units, labels, train_fraction, rng)
        splits.append(Split(f"{kind}-{repeat}", tuple(train), tuple(test)))
    return splits


def case_split(records: Sequence[Record], share: float, seed: int
               ) -> tuple[list[Record], list[Record]]:
    """(rest, about `share` of them) of a lab's reviewed cells or fields, grouped by case or
    slide (`group_key`) and stratified: the part held out to measure on, or set aside to
    choose the epoch. Everything is in the rest when `share` is 0 or there is one case."""
    if share <= 0 or len({r.group_key for r in records}) < 2:
        return list(records), []
    split = monte_carlo(records, repeats=1, train_fraction=1 - share, seed=seed,
                        grouped=True)[0]
    return [records[i] for i in split.train], [records[i] for i in split.test]


def leave_one_source_out(records: Sequence[Cell | Field]) -> list[Split]:
    """One split per source: test on it, train on the rest.

    A training record that is an exact copy of a test record (by content hash)
    is dropped from training.
    """
    test_content: dict[str, set[tuple]] = defaultdict(set)
    for record in records:
        test_content[record.source].add(content_key(record))
    splits = []
    for source in sorted(test_content):
        test = [i for i, r in enumerate(records) if r.source == source]
        train = [
            i
            for i, r in enumerate(records)
            if r.source != source and content_key(r) not in test_content[source]
        ]
        splits.append(Split(f"without-{source}", tuple(train), tuple(test)))
    return splits


# A source's own split lists win over random assignment (BCCD's VOC lists, KBC's folders).
_OWN_PARTS = {"train": "train", "val": "val", "test": "test", "TEST_SIMPLE": "test"}


def _grouped_cut(records, indices, fraction, seed):
    """Split `indices` into (first, second) with ~`fraction` of records in first."""
    subset = [records[i] for i in indices]
    split = monte_carlo(subset, repeats=1, train_fraction=fraction, seed=seed, grouped=True)[0]
    return [indices[i] for i in split.train], [indices[i] for i in split.test]


def holdout(
    records: Sequence[Cell | Field],
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, tuple[int, ...]]:
    """A fixed train / val / test partition, grouped and stratified.

    Records whose source ships its own split (BCCD's VOC train/val/test lists,
    KBC's TEST_SIMPLE) keep it. The rest is split by group, per source: a source
    that has its own test part gives only train/val, others give all three.
    """
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    rest: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        part = _OWN_PARTS.get(record.subset or "")
        if part:
            parts[part].append(index)
        else:
            rest[record.source].append(index)
    own_test = {records[i].source for i in parts["test"]}
    for source, indices in sorted(rest.items()):
        test_share = 0.0 if source in own_test else test_fraction
        held = val_fraction + test_share
        train, held_out = _grouped_cut(records, indices, 1 - held, seed)
        parts["train"].extend(train)
        if test_share:
            val, test = _grouped_cut(records, held_out, val_fraction / held, seed)
            parts["val"].extend(val)
            parts["test"].extend(test)
        else:
            parts["val"].extend(held_out)
    return {name: tuple(sorted(found)) for name, found in parts.items()}
