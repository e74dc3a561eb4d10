"""The adaptation learning curve: a table, a figure and its section of docs/RESULTS.md."""

from __future__ import annotations

from pathlib import Path

from leukodiff.metrics.adaptation import AdaptationResults
from leukodiff.reports.labs import NAMES, write_section_files

SECTION = "adaptation"
#: AdaptConfig.layers in words.
LAYERS = {"all": "every layer", "early": "the first conv blocks (the rest frozen)",
          "head": "the FC head on the frozen base"}


def render_section(results: AdaptationResults, figure: str = "figures/adaptation.png") -> str:
    config = results.config
    shots = [k for k in config["shots"]]
    adapt = config["adapt"]
    layers = adapt.get("layers", "all")  # absent from records written before it was
    options = "" if layers == "all" else f" --layers {layers} --lr {adapt['lr']}"
    lines = [
        f"<!-- {SECTION}:start -->",
        "## 0b. Teaching it a lab: level-2 macro-F1 after k reviewed cells per type",
        "",
        f"`leukodiff evaluate adaptation --labs-dir {results.labs_dir}{options} --docs "
        "docs/`. The level-2 models trained without each lab (its leave-one-lab-out fold, "
        f"section 0) are adapted as `leukodiff adapt` does (fine-tuning {LAYERS[layers]} "
        "with a replay sample of their "
        f"own training cells; {adapt['epochs']} epochs, lr {adapt['lr']}, "
        f"{adapt['replay_per_class']} replay cells per type; the epoch, the unadapted "
        f"model included, chosen on {adapt.get('validation', 0):.0%} of the drawn cells' "
        "cases) with k reviewed cells of each "
        "type drawn from the lab's training part, and measured on its test part (grouped by "
        f"slide or field; no draw touches it). {config['draws']} draws per k (k = 0: the "
        "model as it came); mean ± sd; seconds per adaptation of both models on 2 CPU "
        "cores. The detector's group classifier is not adapted yet.",
        "",
        "| lab | test cells | " + " | ".join(f"k = {k}" for k in shots) + " |",
        "|---|---|" + "---|" * len(shots),
    ]
    for lab, curve in results.labs.items():
        if curve.skipped is not None or curve.summary is None:
            lines.append(f"| {NAMES.get(lab, lab)} | - | "
                         + " | ".join("-" for _ in shots) + f" |  <!-- {curve.skipped} -->")
            continue
        by_k = {row.k: row for row in curve.summary}
        cells = []
        for k in shots:
            row = by_k.get(k)
            if row is None:
                cells.append("-")
            elif row.draws > 1:
                cells.append(f"{row.macro_f1:.3f} ± {row.macro_f1_sd:.3f} "
                             f"({row.seconds:.0f} s)")
            else:
                cells.append(f"{row.macro_f1:.3f}")
        lines.append(f"| {NAMES.get(lab, lab)} | {curve.test_cells} | "
                     + " | ".join(cells) + " |")
    lines += _detector_lines(results)
    lines += ["", f"![adaptation]({figure})", "", f"<!-- {SECTION}:end -->"]
    return "\n".join(lines) + "\n"


def _detector_lines(results: AdaptationResults) -> list[str]:
    """The detector's curve: precision / recall at IoU 0.5 on each lab's test fields."""
    curves = results.detector or {}
    if not curves or results.detector_config is None:
        return []
    config = results.detector_config
    adapt = config["adapt"]
    shots = list(config["shots"])
    lines = [
        "",
        "### The detector, taught by the same reviews",
        "",
        f"`leukodiff evaluate adaptation --labs-dir {config['labs_dir']} --labs '' "
        f"--detector-labs {','.join(config['labs'])} --detector-shots "
        f"{','.join(map(str, shots))} --docs docs/`. The fold detector that never saw the "
        "lab is fine-tuned as `leukodiff adapt --fields` does on the fields holding k "
        "reviewed cells of each type (BCD, untyped: 5k cells) drawn from the lab's training "
        "part, every white cell in them boxed, with as many replay fields of its own "
        f"training labs ({adapt['epochs']} epochs, lr {adapt['lr']}, first "
        f"{adapt['frozen_blocks']} MobileNet layers kept; the epoch and the operating "
        f"threshold chosen on {adapt['validation']:.0%} of the drawn fields' slides); "
        "precision / recall at IoU 0.5 on the lab's test fields (Chula's reviewed unboxed "
        f"cells ignored) through onnxruntime. {config['draws']} draw(s) per k (median); "
        "seconds per adaptation on 2 CPU cores. Targets at k = 25: precision >= 0.95.",
        "",
        "| lab | test fields (cells) | " + " | ".join(f"k = {k}" for k in shots) + " |",
        "|---|---|" + "---|" * len(shots),
    ]
    for lab, curve in curves.items():
        if curve.skipped is not None or curve.summary is None:
            lines.append(f"| {NAMES.get(lab, lab)} | - | " + " | ".join("-" for _ in shots)
                         + f" |  <!-- {curve.skipped} -->")
            continue
        by_k = {row.k: row for row in curve.summary}
        cells = []
        for k in shots:
            row = by_k.get(k)
            cells.append("-" if row is None else
                         f"{row.precision:.3f} / {row.recall:.3f}"
                         + (f" ({row.reviewed_fields:.0f} fields, {row.seconds:.0f} s)"
                            if k else ""))
        lines.append(f"| {NAMES.get(lab, lab)} | {curve.test_fields} "
                     f"({curve.test_cells}) | " + " | ".join(cells) + " |")
    return lines


def plot_adaptation(results: AdaptationResults, path: Path) -> Path:
    """Macro-F1 against reviewed cells per type, one line per lab, draws as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {lab: c for lab, c in (results.detector or {}).items()
              if c.skipped is None and c.summary is not None}
    figure, panels = plt.subplots(1, 2 if curves else 1, figsize=(12 if curves else 6.5, 4),
                                  squeeze=False)
    axes = panels[0][0]
    for lab, curve in results.labs.items():
        if curve.skipped is not None or curve.summary is None:
            continue
        rows = curve.summary
        axes.errorbar([r.k for r in rows], [r.macro_f1 for r in rows],
                      yerr=[r.macro_f1_sd for r in rows], marker="o", capsize=3,
                      label=f"{NAMES.get(lab, lab)} ({curve.test_cells} test cells)")
    axes.axhline(0.95, color="grey", linestyle=":", label="target at k = 25")
    axes.set_xlabel("reviewed cells per type used to adapt")
    axes.set_ylabel("level-2 macro-F1 on the lab's test part")
    axes.set_ylim(0, 1)
    axes.legend(loc="lower right", fontsize=8)
    axes.set_title("Teaching leukodiff a lab it never saw")
    if curves:
        right = panels[0][1]
        for lab, curve in curves.items():
            points = curve.summary or []
            line, = right.plot([r.k for r in points], [r.precision for r in points],
                               marker="o", label=f"{NAMES.get(lab, lab)} precision")
            right.plot([r.k for r in points], [r.recall for r in points], marker="s",
                       linestyle="--", color=line.get_color(), label="recall")
        right.axhline(0.95, color="grey", linestyle=":", label="precision target")
        right.set_xlabel("reviewed cells per type (their fields) used to adapt")
        right.set_ylabel("detector on the lab's test fields (IoU 0.5)")
        right.set_ylim(0, 1.02)
        right.legend(loc="lower right", fontsize=7, ncol=2)
        right.set_title("The detector, taught by the same reviews")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_adaptation_report(results: AdaptationResults, out: Path, docs: Path | None = None
                            ) -> list[Path]:
    """`OUT/adaptation.json`, `.png`, `ADAPTATION.md`; with `docs`, also
    docs/adaptation.json, the figure and the section after section 0 of docs/RESULTS.md
    (after its hand-written notes, `labs_ablation`, when there are some)."""
    return write_section_files(results, out, docs, SECTION, render_section, plot_adaptation,
                               after=("labs_ablation", "labs"))
