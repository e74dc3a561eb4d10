"""One `analyze` run: many inputs in, one output folder out; a bad file never stops the batch."""

from __future__ import annotations

import glob
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from leukodiff.data.scan import IMAGE_SUFFIXES, Track, no_progress
from leukodiff.imaging import ImageError, load_image
from leukodiff.pipeline.analyzer import AnalysisError, Analyzer, Differential, FieldResult
from leukodiff.pipeline.wholeslide import analyze_whole_slide, is_whole_slide
from leukodiff.reports.outputs import (
    Gallery,
    field_stem,
    write_cells_csv,
    write_coco,
    write_field,
    write_report,
)
from leukodiff.reports.wholeslide import write_whole_slide


class OutputExistsError(FileExistsError):
    """The output folder holds earlier results and --overwrite was not given."""


@dataclass
class RunResult:
    results: list[FieldResult] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (input, reason)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (whole slide, note)
    differential: Differential | None = None


def expand_inputs(inputs: Sequence[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files, folders (their images, sorted) and glob patterns, in order, without repeats."""
    files: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir() and is_whole_slide(path):  # a DICOM WSI folder: one slide
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                skipped.append((text, "folder holds no image files"))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(text):
            found = sorted(Path(p) for p in glob.glob(text) if Path(p).is_file())
            if not found:
                skipped.append((text, "pattern matches no files"))
            files.extend(found)
        else:
            skipped.append((text, "no such file or folder"))
    return list(dict.fromkeys(files)), skipped


def prepare_output(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out_dir} already holds results; pass --overwrite to replace "
                                "them or choose another --out")
    (out_dir / "fields").mkdir(parents=True, exist_ok=True)


def models_of(analyzer: Analyzer) -> dict[str, str]:
    """The report's "Models" list: each model file and its hash, and the runtime."""
    models = {role: f"{m.provenance.weights or '?'} (sha256 {(m.sha256 or '?')[:12]})"
              for role, m in analyzer.backend.manifests.items()}
    models["runtime"] = analyzer.backend.name
    return models


def analyze_to_folder(analyzer: Analyzer, inputs: Sequence[str | Path], out_dir: Path, *,
                      overwrite: bool = False, monolayer_only: bool = False,
                      track: Track = no_progress) -> RunResult:
    """Analyse every input, write per-field and whole-run outputs, report what was skipped.
    `monolayer_only`: whole slides count only their counting area's cells."""
    out_dir = Path(out_dir)
    prepare_output(out_dir, overwrite)
    files, skipped = expand_inputs(inputs)
    run = RunResult(skipped=skipped)
    gallery = Gallery()
    for path in track(files, "Analysing fields"):
        if is_whole_slide(path):  # read window by window, never whole
            try:
                slide = analyze_whole_slide(analyzer, path, monolayer_only=monolayer_only)
            except AnalysisError as error:
                run.skipped.append((str(path), str(error).removeprefix(f"{path}: ")))
                continue
            write_whole_slide(out_dir, field_stem(slide.field, len(run.results) + 1), slide,
                              gallery)
            run.notes.extend((str(path), note) for note in slide.summary())
            run.results.append(slide.field)
            continue
        try:
            image = load_image(path)
            result = analyzer(image, name=str(path), look=True)
        except (ImageError, AnalysisError) as error:
            run.skipped.append((str(path), str(error).removeprefix(f"{path}: ")))
            continue
        write_field(out_dir, field_stem(result, len(run.results) + 1), image, result)
        gallery.add(image, result)
        run.results.append(result)
    run.differential = analyzer.differential(run.results)
    write_cells_csv(out_dir / "cells.csv", run.results)
    write_coco(out_dir / "detections.coco.json", run.results)
    (out_dir / "differential.json").write_text(json.dumps(
        {**run.differential.to_dict(), "skipped": [{"input": i, "reason": r}
                                                   for i, r in run.skipped],
         "notes": [{"input": i, "note": n} for i, n in run.notes]}, indent=2) + "\n")
    write_report(out_dir / "report.html", run.differential, gallery, run.skipped,
                 models_of(analyzer))
    return run
