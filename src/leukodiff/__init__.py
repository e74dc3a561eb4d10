"""leukodiff: white-blood-cell differential counts from peripheral blood smear images."""

from leukodiff.taxonomy import CellType, Group

__all__ = ["CellType", "Group"]
__version__ = "0.1.0"
