"""Fitting the familiarity reference (`pipeline.familiarity`) on the detector's training labs.

    familiarity, report = fit_familiarity(("bccd", "bcd", "chula"))

Each lab's fields are split as the detector's training splits them
(`training.detector.prepare_fields`): the reference is fitted on the train parts, its
threshold on the validation parts, and the test parts are only reported (how often
the warning fires on the labs it knows: it should be rare).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from leukodiff.data.records import Field
from leukodiff.data.scan import Track, no_progress
from leukodiff.imaging import load_image
from leukodiff.pipeline.familiarity import Familiarity, familiarity_path, image_features
from leukodiff.training.detector import DetectorConfig, prepare_fields


class FeatureCache:
    """Image features by path, computed once (folds of `evaluate labs` share images)."""

    def __init__(self) -> None:
        self._features: dict[Path, np.ndarray] = {}

    def __call__(self, fields: Sequence[Field], track: Track = no_progress,
                 description: str = "Measuring how fields look") -> np.ndarray:
        todo = [f for f in dict.fromkeys(f.image for f in fields) if f not in self._features]
        for path in track(todo, description):
            self._features[path] = image_features(load_image(path))
        return np.array([self._features[f.image] for f in fields]).reshape(len(fields), -1)


def fit_familiarity(sources: Sequence[str], data_root: str | Path | None = None, *,
                    seed: int = 0, features: FeatureCache | None = None,
                    track: Track = no_progress) -> tuple[Familiarity, dict]:
    """The reference of `sources`' train parts, thresholded on their val parts; the
    report gives how often it fires on each lab's test part. A source with no validation
    part (the pig fields: training only, a look no user's lab has) is left out of the
    reference, and the report says so: fields like it should be warned about."""
    features = features or FeatureCache()
    data = prepare_fields(DetectorConfig(sources=tuple(sources), seed=seed), data_root, track)
    left_out = [s for s in sources if not any(f.source == s for f in data.val)]
    sources = [s for s in sources if s not in left_out]
    train = {source: features([f for f in data.train if f.source == source], track)
             for source in sources}
    held_out = [features([f for f in data.val if f.source == source], track)
                for source in sources]
    familiarity = Familiarity.fit(train, held_out)
    report = {"sources": list(sources), "left_out": left_out, "seed": seed,
              "split": "training.detector."
              "prepare_fields: train parts fit, val parts set the threshold, test parts "
              "reported", "fires_on_test_parts": {}}
    for source in sources:
        tested = [f for f in data.test if f.source == source]
        if tested:
            scores = familiarity.scores(features(tested, track))
            report["fires_on_test_parts"][source] = {
                "fields": len(tested), "unfamiliar": int((scores > familiarity.threshold).sum())}
    return familiarity, report


def write_familiarity(detector: Path, sources: Sequence[str], data_root=None, *,
                      seed: int = 0, features: FeatureCache | None = None,
                      track: Track = no_progress, command: str = "") -> tuple[Path, dict]:
    """Fit the reference of a detector's training labs and write it beside the detector."""
    familiarity, report = fit_familiarity(sources, data_root, seed=seed, features=features,
                                          track=track)
    path = familiarity_path(Path(detector))
    familiarity.save(path, {"fitted": report, "command": command})
    return path, report
