"""docs/RESULTS.md is rendered from stored records: each section, rendered again from the
JSON its evaluation wrote, is byte for byte the section in the file (no evaluation rerun).
And `evaluate all`'s typed record survives JSON: a quick run's stored record renders the
Markdown that run wrote (tests/data/study_quick.*)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from leukodiff.metrics.adaptation import AdaptationResults
from leukodiff.metrics.labs import LabsResults
from leukodiff.metrics.records import from_plain, to_plain
from leukodiff.metrics.study import ClassRow, FlatVsTwoLevel
from leukodiff.reports import adaptation, labs
from leukodiff.reports.study import keep_marked_sections, load_study, render_markdown

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DATA = Path(__file__).resolve().parent / "data"


def marked_section(text: str, name: str) -> str:
    found = re.search(rf"<!-- {name}:start -->.*?<!-- {name}:end -->\n", text, flags=re.S)
    assert found, f"no marked section {name!r}"
    return found.group(0)


@pytest.mark.parametrize("name, kind, render", [
    ("labs", LabsResults, labs.render_section),
    ("adaptation", AdaptationResults, adaptation.render_section)])
def test_each_docs_section_is_its_stored_json_rendered(name, kind, render):
    stored = (DOCS / f"{name}.json").read_text()
    results = from_plain(kind, json.loads(stored))
    text = (DOCS / "RESULTS.md").read_text()
    assert render(results, f"figures/{name}.png") == marked_section(text, name)
    # the typed record writes the same JSON back: `--docs` rewrites it unchanged
    assert json.dumps(to_plain(results), indent=1) + "\n" == stored


def test_the_study_part_is_docs_study_json_rendered():
    record = DOCS / "study.json"
    if not record.exists():
        pytest.skip("docs/study.json is written by the next `leukodiff evaluate all`")
    text = (DOCS / "RESULTS.md").read_text()
    assert keep_marked_sections(text, render_markdown(load_study(record))) == text


def test_a_stored_study_renders_the_markdown_its_run_wrote():
    study = load_study(DATA / "study_quick.json")
    assert isinstance(study.paper["random"]["lymphocyte"], ClassRow)
    assert isinstance(study.flat_vs_two_level["KBC, random"], FlatVsTwoLevel)
    assert math.isnan(study.paper["random"]["average"].accuracy[1])  # NaN survives JSON
    assert render_markdown(study) == (DATA / "study_quick.md").read_text()
    stored = (DATA / "study_quick.json").read_text()
    assert json.dumps(to_plain(study), indent=1) + "\n" == stored
