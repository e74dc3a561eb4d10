"""Training loops: level-2 classifiers (and, later, the level-1 detector)."""
