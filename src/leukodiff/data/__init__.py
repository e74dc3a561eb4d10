"""Data layer: records, readers for every source, crops and leak-free splits."""

from leukodiff.data.records import Box, Cell, Field, Loaded, Skipped
from leukodiff.data.root import DataNotFoundError, data_root

__all__ = ["Box", "Cell", "DataNotFoundError", "Field", "Loaded", "Skipped", "data_root"]
