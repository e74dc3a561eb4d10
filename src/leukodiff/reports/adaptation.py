"""The adaptation learning curve: a table, a figure and its section of docs/RESULTS.md."""

from __future__ import annotations

from pathlib import Path

from leukodiff.reports.labs import NAMES, write_section_files

SECTION = "adaptation"


def render_section(results: dict, figure: str = "figures/adaptation.png") -> str:
    config = results["config"]
    shots = [k for k in config["shots"]]
    adapt = config["adapt"]
    lines = [
        f"<!-- {SECTION}:start -->",
        "## 0b. Teaching it a lab: level-2 macro-F1 after k reviewed cells per type",
        "",
        f"`leukodiff evaluate adaptation --labs-dir {results['labs_dir']} --docs docs/`. "
        "The level-2 models trained without each lab (its leave-one-lab-out fold, section "
        "0) are adapted as `leukodiff adapt` does (fine-tuning with a replay sample of their "
        f"own training cells; {adapt['epochs']} epochs, lr {adapt['lr']}, "
        f"{adapt['replay_per_class']} replay cells per type; the epoch, the unadapted "
        f"model included, chosen on {adapt.get('validation', 0):.0%} of the drawn cells' "
        "cases) with k reviewed cells of each "
        "type drawn from the lab's training part, and measured on its test part (grouped by "
        f"slide or field; no draw touches it). {config['draws']} draws per k (k = 0: the "
        "model as it came); mean ± sd; seconds per adaptation of both models on 2 CPU "
        "cores. The detector and its group classifier are not adapted yet.",
        "",
        "| lab | test cells | " + " | ".join(f"k = {k}" for k in shots) + " |",
        "|---|---|" + "---|" * len(shots),
    ]
    for lab, curve in results["labs"].items():
        if "skipped" in curve:
            lines.append(f"| {NAMES.get(lab, lab)} | - | "
                         + " | ".join("-" for _ in shots) + f" |  <!-- {curve['skipped']} -->")
            continue
        by_k = {row["k"]: row for row in curve["summary"]}
        cells = []
        for k in shots:
            row = by_k.get(k)
            if row is None:
                cells.append("-")
            elif row["draws"] > 1:
                cells.append(f"{row['macro_f1']:.3f} ± {row['macro_f1_sd']:.3f} "
                             f"({row['seconds']:.0f} s)")
            else:
                cells.append(f"{row['macro_f1']:.3f}")
        lines.append(f"| {NAMES.get(lab, lab)} | {curve['test_cells']} | "
                     + " | ".join(cells) + " |")
    lines += ["", f"![adaptation]({figure})", "", f"<!-- {SECTION}:end -->"]
    return "\n".join(lines) + "\n"


def plot_adaptation(results: dict, path: Path) -> Path:
    """Macro-F1 against reviewed cells per type, one line per lab, draws as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.5, 4))
    for lab, curve in results["labs"].items():
        if "skipped" in curve:
            continue
        rows = curve["summary"]
        axes.errorbar([r["k"] for r in rows], [r["macro_f1"] for r in rows],
                      yerr=[r["macro_f1_sd"] for r in rows], marker="o", capsize=3,
                      label=f"{NAMES.get(lab, lab)} ({curve['test_cells']} test cells)")
    axes.axhline(0.85, color="grey", linestyle=":", label="target on a new lab")
    axes.set_xlabel("reviewed cells per type used to adapt")
    axes.set_ylabel("level-2 macro-F1 on the lab's test part")
    axes.set_ylim(0, 1)
    axes.legend(loc="lower right", fontsize=8)
    axes.set_title("Teaching leukodiff a lab it never saw")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_adaptation_report(results: dict, out: Path, docs: Path | None = None) -> list[Path]:
    """`OUT/adaptation.json`, `.png`, `ADAPTATION.md`; with `docs`, also
    docs/adaptation.json, the figure and the section after section 0 of docs/RESULTS.md."""
    return write_section_files(results, out, docs, SECTION, render_section, plot_adaptation,
                               after="labs")
