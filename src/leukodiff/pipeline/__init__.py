"""The multi-level pipeline: detector -> route by group -> level-2 classifiers -> differential."""

from leukodiff.pipeline.analyzer import (
    AnalysisError,
    Analyzer,
    CellCall,
    Differential,
    FieldResult,
)

__all__ = ["AnalysisError", "Analyzer", "CellCall", "Differential", "FieldResult"]
