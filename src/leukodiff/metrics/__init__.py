"""Metrics that training (validation, model selection) and evaluation (reported figures)
both use: `classification` (per-class metrics, confidence calibration) and `detection`
(COCO AP, matching). Below training and evaluation; imports data, taxonomy and
`pipeline.boxes` only."""
