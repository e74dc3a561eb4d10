"""Split invariants on the real KBC/PBC/BCCD records and on small synthetic ones."""

from collections import Counter, defaultdict
from pathlib import Path

import pytest

from leukodiff.data.records import Cell
from leukodiff.data.sources import load_cells, load_fields
from leukodiff.data.splits import (
    case_split,
    find_duplicates,
    holdout,
    leave_one_source_out,
    monte_carlo,
)
from leukodiff.taxonomy import CellType


@pytest.fixture(scope="module")
def kbc(shared_data):
    return [c for c in load_cells("kbc", shared_data).records if c.subset == "TRAIN"]


@pytest.fixture(scope="module")
def pbc(shared_data):
    return load_cells("pbc", shared_data).records


def _class_share(records, indices):
    return Counter(records[i].cell_type for i in indices)


def test_grouped_splits_keep_every_source_cell_on_one_side(kbc):
    for split in monte_carlo(kbc, repeats=3, seed=1, grouped=True):
        train_groups = {kbc[i].group_key for i in split.train}
        test_groups = {kbc[i].group_key for i in split.test}
        assert not train_groups & test_groups
        assert len(split.train) + len(split.test) == len(kbc)
        assert set(split.train).isdisjoint(split.test)


def test_random_splits_leak_source_cells_as_the_paper_did(kbc):
    split = monte_carlo(kbc, repeats=1, seed=1)[0]
    shared = {kbc[i].group_key for i in split.train} & {kbc[i].group_key for i in split.test}
    assert len(shared) > 200  # nearly every KBC source cell is on both sides


@pytest.mark.parametrize("grouped", [False, True])
def test_splits_are_stratified(kbc, grouped):
    total = _class_share(kbc, range(len(kbc)))
    for split in monte_carlo(kbc, repeats=2, seed=3, grouped=grouped):
        train = _class_share(kbc, split.train)
        for cell_type, n in total.items():
            # grouped: whole cells of 16-155 copies move together, so allow more slack
            assert train[cell_type] / n == pytest.approx(0.7, abs=0.08 if grouped else 0.01)


def test_splits_are_deterministic_for_a_seed_and_differ_between_seeds_and_repeats(pbc):
    a = monte_carlo(pbc, repeats=2, seed=7)
    b = monte_carlo(pbc, repeats=2, seed=7)
    c = monte_carlo(pbc, repeats=2, seed=8)
    assert a == b
    assert a[0].test != c[0].test
    assert a[0].test != a[1].test


def test_exact_duplicates_are_found_and_never_split(pbc):
    duplicates = find_duplicates(pbc)
    by_hash = defaultdict(list)
    for index, record in enumerate(pbc):
        by_hash[record.sha256].append(index)
    copies = [indices for indices in by_hash.values() if len(indices) > 1]
    assert duplicates and sorted(duplicates) == sorted(copies)  # PBC has copies: all found
    assert all(len({pbc[i].sha256 for i in group}) == 1 for group in duplicates)
    for grouped in (False, True):
        for split in monte_carlo(pbc, repeats=5, seed=0, grouped=grouped):
            test = set(split.test)
            for group in duplicates:
                assert len({i in test for i in group}) == 1


def test_leave_one_source_out(shared_data, pbc, kbc):
    bccd_cells = load_cells("bccd", shared_data).records
    records = [*pbc, *kbc, *bccd_cells]
    splits = {s.name: s for s in leave_one_source_out(records)}
    assert set(splits) == {"without-bccd", "without-kbc", "without-pbc"}
    for source in ("bccd", "kbc", "pbc"):
        split = splits[f"without-{source}"]
        assert {records[i].source for i in split.test} == {source}
        assert source not in {records[i].source for i in split.train}
        assert len(split.train) + len(split.test) == len(records)


def test_fields_split_too(shared_data):
    fields = load_fields("bccd", shared_data).records
    split = monte_carlo(fields, repeats=1, grouped=True)[0]
    assert len(split.test) == pytest.approx(0.3 * len(fields), abs=6)


def _cell(key: str, cell_type: CellType, sha: str) -> Cell:
    return Cell(Path(f"/x/{key}-{sha}.jpg"), "toy", cell_type, key, sha)


def test_duplicates_link_groups_transitively():
    # b's copy is an exact duplicate of a's copy: a and b must then travel together
    records = [
        _cell("a", CellType.MONOCYTE, "1"), _cell("a", CellType.MONOCYTE, "2"),
        _cell("b", CellType.MONOCYTE, "2"), _cell("b", CellType.MONOCYTE, "3"),
        *(_cell(f"c{i}", CellType.MONOCYTE, f"c{i}") for i in range(10)),
        *(_cell(f"l{i}", CellType.LYMPHOCYTE, f"l{i}") for i in range(10)),
    ]
    for split in monte_carlo(records, repeats=10, seed=0, grouped=True):
        sides = {i in split.test for i in range(4)}
        assert len(sides) == 1


def test_bad_train_fraction_is_refused(pbc):
    with pytest.raises(ValueError, match="between 0 and 1"):
        monte_carlo(pbc[:10], train_fraction=1.0)


def test_holdout_keeps_own_lists_and_splits_the_rest_by_group(shared_data, pbc, kbc):
    bccd_cells = load_cells("bccd", shared_data).records
    kbc_all = load_cells("kbc", shared_data).records
    records = [*pbc, *bccd_cells, *kbc_all]
    parts = holdout(records, seed=0)
    assert sorted(i for p in parts.values() for i in p) == list(range(len(records)))
    for index in parts["test"]:
        r = records[index]
        assert r.source == "pbc" or r.subset in ("test", "TEST_SIMPLE")
    assert {records[i].subset for i in parts["val"] if records[i].source == "bccd"} == {"val"}
    pbc_test = [i for i in parts["test"] if records[i].source == "pbc"]
    assert len(pbc_test) == pytest.approx(0.2 * len(pbc), abs=5)
    kbc_groups = {name: {records[i].group_key for i in p if records[i].source == "kbc"}
                  for name, p in parts.items()}
    assert not kbc_groups["train"] & kbc_groups["val"]
    assert holdout(records, seed=0) == parts


def test_case_split_keeps_a_case_on_one_side_and_holds_nothing_from_one_case():
    cases = [_cell(f"case{i // 4}", list(CellType)[i % 2], f"{i}") for i in range(40)]
    rest, held = case_split(cases, 0.25, seed=0)
    assert {c.group_key for c in rest}.isdisjoint({c.group_key for c in held})
    assert len(rest) + len(held) == 40 and 4 <= len(held) <= 16  # whole cases of 4
    assert case_split(cases, 0.25, seed=0) == (rest, held)  # seeded
    assert case_split(cases, 0.0, seed=0) == (cases, [])  # nothing held out
    one_case = [_cell("case0", CellType.LYMPHOCYTE, f"{i}") for i in range(5)]
    assert case_split(one_case, 0.5, seed=0) == (one_case, [])  # nothing to hold out
