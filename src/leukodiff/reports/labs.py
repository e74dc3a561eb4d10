"""The leave-one-lab-out results (`evaluate labs`) as a table, figures and a RESULTS.md section.

The section sits first in docs/RESULTS.md between markers, so `evaluate all`, which
rewrites the rest of the file, keeps it (`reports.study.keep_marked_sections`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from leukodiff.metrics.labs import LabRun, LabsResults
from leukodiff.metrics.records import to_plain

SECTION = "labs"
START, END = f"<!-- {SECTION}:start -->", f"<!-- {SECTION}:end -->"
TARGETS = {"precision": 0.90, "recall": 0.95, "exact_count": 0.90, "macro_f1": 0.85,
           "min_recall": 0.70, "end_to_end": 0.85}
NAMES = {"bccd": "BCCD", "pbc": "PBC", "chula": "Chula", "bcd": "BCD"}


def _f(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


def _home(fold: LabRun) -> str:
    """Fields flagged / tested on the training labs' own test parts."""
    if not fold.warning_on_training_labs:
        return "-"
    return ", ".join(f"{NAMES.get(lab, lab)} {v.unfamiliar}/{v.fields}"
                     for lab, v in fold.warning_on_training_labs.items())


def rows(results: LabsResults) -> list[dict[str, str]]:
    """One row per held-out lab (and per lab the shipped models never saw)."""
    out = []
    runs = [(lab, "left out of training", fold) for lab, fold in results.folds.items()]
    runs += [(lab, "shipped models (never saw it)", fold)
             for lab, fold in results.shipped.items()]
    for lab, how, fold in runs:
        if fold.skipped is not None:
            out.append({"lab": NAMES.get(lab, lab), "models": f"skipped: {fold.skipped}"})
            continue
        d, t, e = fold.detector, fold.level2, fold.end_to_end
        out.append({
            "lab": NAMES.get(lab, lab), "models": how,
            "precision": _f(d and d.precision), "recall": _f(d and d.recall),
            "ap50": _f(d and d.ap50),
            "exact_count": _f(d and d.exact_count, True),
            "accuracy": _f(t and t.accuracy, True), "macro_f1": _f(t and t.macro_f1),
            "min_recall": (f"{t.min_recall:.2f} ({min(t.recall, key=t.recall.__getitem__)})"
                           if t else "-"),
            "end_to_end": (f"{e.right}/{e.cells} ({_f(e.share, True)})"
                           if e and e.share is not None else "-"),
            "warned": _f(fold.unlike_training, True),
            "warned_home": _home(fold),
        })
    return out


#: The figures whose spread over seeds the section shows (`LabsConfig.repeat_seeds`).
SPREAD: tuple[tuple[str, str, Callable[[LabRun], float | None]], ...] = (
    ("precision", "det. precision", lambda r: r.detector and r.detector.precision),
    ("recall", "det. recall", lambda r: r.detector and r.detector.recall),
    ("ap50", "AP50", lambda r: r.detector and r.detector.ap50),
    ("exact_count", "exact count", lambda r: r.detector and r.detector.exact_count),
    ("macro_f1", "L2 macro-F1", lambda r: r.level2 and r.level2.macro_f1),
    ("end_to_end", "found + typed right", lambda r: r.end_to_end and r.end_to_end.share),
)


def _further_seeds(results: LabsResults, lab: str) -> list[tuple[int, LabRun]]:
    """The lab's fold trained again with other seeds (`repeats`), by seed."""
    return sorted(((int(seed), by_lab[lab]) for seed, by_lab in results.repeats.items()
                   if lab in by_lab), key=lambda pair: pair[0])


def spread_rows(results: LabsResults) -> list[dict[str, str]]:
    """Per held-out lab run with more than one seed: each figure seed by seed (the table's
    seed first) and their mean."""
    out = []
    for lab, fold in results.folds.items():
        seeded = [(results.config["seed"], fold), *_further_seeds(results, lab)]
        if fold.skipped is not None or len(seeded) < 2:
            continue
        runs = [run for _, run in seeded]
        row = {"lab": NAMES.get(lab, lab), "seeds": ", ".join(str(s) for s, _ in seeded)}
        for key, _, value in SPREAD:
            values = [value(run) for run in runs]
            if any(v is None for v in values):
                row[key] = "-"
                continue
            percent = key in ("exact_count", "end_to_end")
            row[key] = (" / ".join(_f(v, percent) for v in values)
                        + f" (mean {_f(sum(values) / len(values), percent)})")
        out.append(row)
    return out


def _spread_section(results: LabsResults) -> list[str]:
    rows_ = spread_rows(results)
    if not rows_:
        return []
    header = [("lab", "held-out lab"), ("seeds", "seeds"), *((k, t) for k, t, _ in SPREAD)]
    return ["", "**From one seed to the next** (`--repeat-seeds`: each fold trained and "
            "measured again, nothing else changed; seed by seed, the table's first):", "",
            "| " + " | ".join(t for _, t in header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r.get(k, "") for k, _ in header) + " |" for r in rows_)]


COLUMNS = [("lab", "held-out lab"), ("models", "models"), ("precision", "det. precision"),
           ("recall", "det. recall"), ("ap50", "AP50"), ("exact_count", "exact count"),
           ("accuracy", "L2 accuracy"), ("macro_f1", "L2 macro-F1"),
           ("min_recall", "L2 lowest recall"), ("end_to_end", "found + typed right"),
           ("warned", "warned: held-out lab"), ("warned_home", "warned: training labs' test")]


def labs_table(results: LabsResults) -> Table:
    table = Table(title="Leave one lab out (onnxruntime, the shipped pipeline)")
    for _, title in COLUMNS:
        table.add_column(title)
    for row in rows(results):
        table.add_row(*(row.get(key, "") for key, _ in COLUMNS))
    return table


def render_section(results: LabsResults, figure: str = "figures/labs.png") -> str:
    config = results.config
    lines = [
        START,
        "## 0. On a lab it was never trained on (leave one lab out)",
        "",
        f"`leukodiff evaluate labs --augmentation {config['augmentation']} --stain "
        f"{config.get('stain', 'none')}"
        + (f" --pbc-paste {config['pbc_paste']:g}" if config.get("pbc_paste") else "")
        + ("" if config.get("other_cells") else " --no-other-cells")
        + " --docs docs/` (the "
        "fold models are kept in `--out` and reused; `--labs` runs some folds and adds them "
        "to the table). For each lab, the detector and the level-2 models are trained on the "
        "*other* labs with the shipped recipe, on a shorter schedule for 2 CPU cores "
        f"(level 2: {config['classifier_epochs']} epochs, at most {config['max_per_class']} "
        f"cells per class and source; every crop classifier, level 2 and the detector's "
        f"group classifier, with augmentation \"{config['augmentation']}\" and crop "
        f"colour normalisation \"{config.get('stain', 'none')}\"; detector: "
        f"{config['detector_epochs']} epochs, mononuclear fields drawn "
        f"{config['mono_oversample']}x"
        + (f", a PBC cell of any type pasted into {config['pbc_paste']:.0%} of training "
           "fields" if config.get("pbc_paste") else "")
        + (", the training labs' boxed red cells and platelets taught to the box head as a "
           "class of their own, `--other-cells`" if config.get("other_cells") else "")
        + "; shipped: all cells, 40 epochs), selected "
        "on those labs' validation parts (the detector's boxes scored 1 - P(background), "
        "its operating threshold the F1-best on the same validation fields), exported to "
        "ONNX and run through the shipped "
        "pipeline on onnxruntime over every labelled image of the held-out lab. Detector: "
        "precision/recall at IoU 0.5 at the operating threshold, COCO AP50, share of fields "
        "whose white-cell count is exact (the white cells BCCD and Chula leave unboxed, "
        "reviewed by eye, `data/sources/*_unboxed.csv`, are ignore regions: found, not a "
        "false positive; missed, not a miss; counted as cells). Level 2: each true box "
        "cropped as the pipeline "
        "crops it, given to its true group's model as the pipeline gives it (its eight "
        "orientations averaged, since 2026-12-07). End to end: true typed cells found and "
        "typed right. Warned: share of fields the \"images unlike the training labs\" "
        "warning flags (the fold's own familiarity reference), on the held-out lab and on the "
        "training labs' test parts. Labs: BCCD, PBC (cells only), BCD (boxes only), Chula "
        "(fetched). Below the folds, the shipped models on any of these labs they never saw: "
        "none is left (the level-2 models learnt BCCD, PBC and Chula; the detector, since "
        "issue #14, BCCD, BCD and Chula), so the folds are the figure for a new lab. Before "
        "issue #14 the shipped models had never seen Chula: there they found white cells at "
        "precision 0.086, recall 0.809, level-2 macro-F1 0.555, 38.1% of cells found and "
        "typed right; the BCCD-only detector found BCD's at precision 0.990, recall 0.971.",
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows(results):
        lines.append("| " + " | ".join(row.get(key, "") for key, _ in COLUMNS) + " |")
    lines += _spread_section(results)
    lines += ["", "Targets (held-out lab): detector precision >= 0.90 at recall >= 0.95, exact "
              "count on >= 90% of fields; level-2 macro-F1 >= 0.85, no type below 0.70 "
              "recall; end to end >= 85%.", "", f"![leave one lab out]({figure})", "", END]
    return "\n".join(lines) + "\n"


def insert_section(path: Path, section: str, name: str = SECTION,
                   after: Sequence[str] = ()) -> None:
    """Put `section` (marked `<!-- NAME:start/end -->`) first in the Markdown file, after
    its title (or right after the first section named in `after` that the file has),
    replacing an earlier copy; create the file when absent."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# leukodiff: evaluation results\n"
    text = re.sub(re.escape(start) + r".*?" + re.escape(end) + r"\n*", "", text, flags=re.S)
    for anchor in (f"<!-- {other}:end -->" for other in after):
        if anchor in text:
            head, _, rest = text.partition(anchor)
            path.write_text(f"{head}{anchor}\n\n{section}\n{rest.lstrip()}")
            return
    title, _, rest = text.partition("\n")
    path.write_text(f"{title}\n\n{section}\n{rest.lstrip()}")


def plot_labs(results: LabsResults, path: Path) -> Path:
    """Grouped bars per held-out lab: detector precision/recall, exact count, level-2
    macro-F1 and lowest recall, end to end; each further seed's figure a black mark on its
    bar (`repeats`); target lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("detector precision", lambda f: f.detector and f.detector.precision),
               ("detector recall", lambda f: f.detector and f.detector.recall),
               ("exact count", lambda f: f.detector and f.detector.exact_count),
               ("level-2 macro-F1", lambda f: f.level2 and f.level2.macro_f1),
               ("level-2 lowest recall", lambda f: f.level2 and f.level2.min_recall),
               ("found + typed right", lambda f: f.end_to_end and f.end_to_end.share)]
    runs = [(f"{NAMES.get(lab, lab)}\nleft out", fold) for lab, fold in results.folds.items()
            if fold.skipped is None]
    repeats = [[run for _, run in _further_seeds(results, lab)]
               for lab, fold in results.folds.items() if fold.skipped is None]
    runs += [(f"{NAMES.get(lab, lab)}\nshipped", fold) for lab, fold in results.shipped.items()]
    repeats += [[] for _ in results.shipped]
    figure, axis = plt.subplots(figsize=(max(6, 1.6 * len(runs) + 2), 4))
    width = 0.8 / len(metrics)
    marked = False
    for i, (name, get) in enumerate(metrics):
        values = [get(fold) for _, fold in runs]
        xs = [j + (i - len(metrics) / 2 + 0.5) * width for j in range(len(runs))]
        axis.bar([x for x, v in zip(xs, values, strict=True) if v is not None],
                 [v for v in values if v is not None], width, label=name)
        seeds = [(x, get(other)) for x, others in zip(xs, repeats, strict=True)
                 for other in others if get(other) is not None]
        if seeds:
            axis.scatter(*zip(*seeds, strict=True), marker="_", s=60, color="black",
                         zorder=3, label=None if marked else "another seed")
            marked = True
    axis.axhline(0.85, color="gray", linestyle="--", linewidth=0.8)
    axis.axhline(0.95, color="gray", linestyle=":", linewidth=0.8)
    axis.set_xticks(range(len(runs)), [label for label, _ in runs])
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("share")
    axis.set_title("On a lab it never trained on (dashed 0.85, dotted 0.95)")
    axis.legend(fontsize=7, ncols=3, loc="lower center", bbox_to_anchor=(0.5, -0.45))
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def write_labs_report(results: LabsResults, out: Path, docs: Path | None = None
                      ) -> list[Path]:
    """`OUT/LABS.md` + `OUT/labs.png`; with `docs`, also docs/labs.json, the figure and
    the section first in docs/RESULTS.md."""
    return write_section_files(results, out, docs, SECTION, render_section, plot_labs)


def write_section_files(results: Any, out: Path, docs: Path | None, name: str,
                        render: Callable[[Any, str], str],
                        plot: Callable[[Any, Path], Path], after: Sequence[str] = ()
                        ) -> list[Path]:
    """An evaluation's own section: `OUT/NAME.md`, `OUT/NAME.png`, `OUT/NAME.json`; with
    `docs`, also docs/NAME.json, docs/figures/NAME.png and the section in docs/RESULTS.md
    (first, or after the first section named in `after` that it has)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = json.dumps(to_plain(results), indent=1) + "\n"
    (out / f"{name}.json").write_text(record)
    written = [out / f"{name}.json", plot(results, out / f"{name}.png")]
    (out / f"{name.upper()}.md").write_text(render(results, f"{name}.png"))
    written.append(out / f"{name.upper()}.md")
    if docs is not None:
        docs = Path(docs)
        written.append(plot(results, docs / "figures" / f"{name}.png"))
        (docs / f"{name}.json").write_text(record)
        insert_section(docs / "RESULTS.md", render(results, f"figures/{name}.png"), name,
                       after)
        written += [docs / f"{name}.json", docs / "RESULTS.md"]
    return written
