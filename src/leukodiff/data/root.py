"""Where the shared blood-smear data sets are read from.

Order: an explicit path (`--data-root`), then `$LEUKODIFF_DATA`, then
`../shared/data` beside the checkout (found from the working directory or from
this package's own location in an editable install).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "LEUKODIFF_DATA"


class DataNotFoundError(FileNotFoundError):
    """A data root or data set that is not where it was looked for."""


def _default_candidates() -> list[Path]:
    checkout = Path(__file__).resolve().parents[3]  # src/leukodiff/data/root.py -> checkout
    return [Path.cwd().parent / "shared" / "data", checkout.parent / "shared" / "data"]


def data_root(explicit: str | Path | None = None) -> Path:
    """The data root to use, or a `DataNotFoundError` naming every place looked at."""
    if explicit is not None:
        candidates, how = [Path(explicit)], "given with --data-root"
    elif os.environ.get(ENV_VAR):
        candidates, how = [Path(os.environ[ENV_VAR])], f"from ${ENV_VAR}"
    else:
        candidates, how = _default_candidates(), "default, beside the checkout"
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise DataNotFoundError(
        f"data root not found ({how}): looked for {looked}. "
        f"Pass --data-root DIR or set {ENV_VAR}=DIR to the folder holding bccd/, kbc/, pbc/, bcd/."
    )


def dataset_dir(name: str, root: str | Path | None = None, must_have: str = "") -> Path:
    """`root/name`, checked to exist (and to contain `must_have`, if given)."""
    base = data_root(root)
    folder = base / name
    if not (folder / must_have).exists():
        raise DataNotFoundError(
            f"data set {name!r} not found: looked for {folder / must_have} under data root {base}"
        )
    return folder
