"""leukodiff: white-blood-cell differential counts from peripheral blood smear images.

    from leukodiff import Analyzer
    with Analyzer.load() as analyzer:
        result = analyzer("field.jpg")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from leukodiff.taxonomy import CellType, Group

if TYPE_CHECKING:
    from leukodiff.pipeline.analyzer import Analyzer

__all__ = ["Analyzer", "CellType", "Group"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """`Analyzer` on first use: `import leukodiff` stays light for the CLI and readers."""
    if name == "Analyzer":
        from leukodiff.pipeline.analyzer import Analyzer

        return Analyzer
    raise AttributeError(f"module 'leukodiff' has no attribute {name!r}")
