"""Where the blood-smear data sets are read from.

A data root is a folder holding data sets by name (`bccd/`, `pbc/`, `chula/`, ...).
Order: an explicit path (`--data-root`), then `$LEUKODIFF_DATA`, then the default
roots beside the checkout (found from the working directory or from this package's
own location in an editable install): `../shared/data` (the shared sets) and
`../data` (sets brought with `fetch`, e.g. Chula; never inside the repository).

An explicit root or `$LEUKODIFF_DATA` may name several roots separated by
`os.pathsep` (":" here); a data set is looked for in each, in order.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "LEUKODIFF_DATA"

# Data sets that are not in ../shared: where they come from, for the error that says
# they are missing (never downloaded at run time).
FETCHED_SETS: dict[str, str] = {
    "chula": ("Chulalongkorn University smear fields (MIT): repository singgihbekti/WBC_Dataset "
              "at commit 45759ab1e6258b9746377a0935077e2eef0da41b; extract its WBC_Samples/ "
              "folder into DATA_ROOT/chula/ (git archive <commit> WBC_Samples | tar -x -C "
              "DATA_ROOT/chula), e.g. ../data/chula beside the checkout"),
    "pig": ("Visayan warty pig smear photos (CC0, white-cell boxes only): repository "
            "FrancescaIE/WBC-detection-dataset at commit "
            "b4dc56f30ee262fc051be7da9489045e55a5c59b; extract its train/ valid/ test/ "
            "folders into DATA_ROOT/pig/ (git archive <commit> train valid test | tar -x -C "
            "DATA_ROOT/pig), e.g. ../data/pig beside the checkout"),
}


class DataNotFoundError(FileNotFoundError):
    """A data root or data set that is not where it was looked for."""


def _default_candidates() -> list[Path]:
    checkout = Path(__file__).resolve().parents[3]  # src/leukodiff/data/root.py -> checkout
    return [base / name for base in (Path.cwd().parent, checkout.parent)
            for name in ("shared/data", "data")]


def _split(text: str | Path) -> list[Path]:
    return [Path(part) for part in str(text).split(os.pathsep) if part]


def data_roots(explicit: str | Path | None = None) -> list[Path]:
    """Every data root to look in, in order, or a `DataNotFoundError` naming where it looked."""
    if explicit is not None:
        candidates, how = _split(explicit), "given with --data-root"
    elif os.environ.get(ENV_VAR):
        candidates, how = _split(os.environ[ENV_VAR]), f"from ${ENV_VAR}"
    else:
        candidates, how = _default_candidates(), "default, beside the checkout"
    found = list(dict.fromkeys(c.resolve() for c in candidates if c.is_dir()))
    if found:
        return found
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise DataNotFoundError(
        f"data root not found ({how}): looked for {looked}. "
        f"Pass --data-root DIR or set {ENV_VAR}=DIR to the folder holding bccd/, kbc/, pbc/, bcd/."
    )


def data_root(explicit: str | Path | None = None) -> Path:
    """The first data root (where the shared sets are)."""
    return data_roots(explicit)[0]


def dataset_dir(name: str, root: str | Path | None = None, must_have: str = "") -> Path:
    """`ROOT/name` in the first data root that has it (with `must_have` inside, if given)."""
    bases = data_roots(root)
    for base in bases:
        if (base / name / must_have).exists():
            return base / name
    where = ", ".join(str(b) for b in bases)
    hint = f". Not in ../shared: {FETCHED_SETS[name]}" if name in FETCHED_SETS else ""
    raise DataNotFoundError(
        f"data set {name!r} not found: looked for {Path(name) / must_have} under data "
        f"root(s) {where}{hint}"
    )


def has_dataset(name: str, root: str | Path | None = None, must_have: str = "") -> bool:
    """Whether a data set is there (evaluations leave an absent fetched set out, and say so)."""
    try:
        dataset_dir(name, root, must_have)
    except DataNotFoundError:
        return False
    return True
