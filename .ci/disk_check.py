"""Refuse to start an install that cannot fit: torch 2.14.1 with its CUDA libraries takes
~5.6 GB in the venv and pip unpacks it through the temporary folder first, so a machine
with less free space fails half-way with pip's bare "[Errno 28] No space left on device"
(CI run of 2026-12-06). Says how much is free where, and what needs it."""

import shutil
import sys
import tempfile
from pathlib import Path

NEEDED_GB = 12.0  # the venv (~7.3 GB with every extra) and pip's unpacked wheels


def main() -> int:
    places = {Path.cwd(), Path(tempfile.gettempdir())}
    free = {place: shutil.disk_usage(place).free / 2**30 for place in places}
    short = {place: gb for place, gb in free.items() if gb < NEEDED_GB}
    if short:
        where = ", ".join(f"{place}: {gb:.1f} GB free" for place, gb in short.items())
        print(f"error: the install needs ~{NEEDED_GB:.0f} GB free (torch with its CUDA "
              f"libraries); {where}. Free space (old venvs, runs/, /tmp) and run again.",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
