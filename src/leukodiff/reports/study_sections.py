"""The sections of docs/RESULTS.md that `evaluate all` (`metrics.study.Study`) fills
beyond Table 3: KBC provenance, cross-source, flat versus two-level, end to end; and the
number formats every section shares (`reports.study` puts them together)."""

from __future__ import annotations

from leukodiff.metrics.heldout import EndToEnd
from leukodiff.metrics.study import COMMAND, PAPER_CLASSES, CrossSource, FlatVsTwoLevel


def pm(value: tuple[float, float], digits: int = 2) -> str:
    mean, std = value
    if std != std:  # nan: a single number
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def p_value(p: float) -> str:
    """A p-value; exactly 0 means below what a float holds."""
    return "< 1e-300" if p == 0 else f"{p:.2g}"


def p_is(p: float) -> str:
    """'p = 0.01' or 'p < 1e-300', for prose."""
    return "p < 1e-300" if p == 0 else f"p = {p:.2g}"


def pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}"



def provenance_section(prov: dict) -> str:
    out = []
    out.append(
        "KBC was made by `augment_data.ipynb` in dhruvp/wbc-classification: each BCCD field "
        "with a single label in `labels.csv` was resized **whole** to 320 x 240, split "
        "80/20 (`random_state=10`), and the training part fed to Keras' "
        "`ImageDataGenerator(rotation_range=20, horizontal_flip=True, vertical_flip=True, "
        "shear_range=0.1, zoom_range=0.1).flow(batch_size=1)` 2,500 times per class. So a "
        "KBC image is a turned, flipped, sheared, zoomed half-size BCCD *field*, and its "
        "white cell is wherever it was in that field, often near an edge. A centre crop "
        "(what the pilot used) often misses part of the cell.")
    out.append("")
    names = prov.get("name_groups")
    if names:
        out.append(
            "**The `<n>` in `_<n>_<id>.jpeg` is not the source cell.** Keras 2.0 wrote "
            "`<n>` = the image's position in the shuffled epoch, and each epoch reshuffles. "
            "Measured on pairs of TRAIN images of the same class:")
        out.append("")
        out.append("| pairs | n | from the same BCCD field | patch similarity (mean) |")
        out.append("|---|---|---|---|")
        for key, label in (("within_name", "same `<n>`"), ("across_name", "different `<n>`"),
                           ("same_field", "same linked BCCD field")):
            v = names[key]
            out.append(f"| {label} | {v['pairs']} | {pct(v['same_field_rate'])}% | "
                       f"{v['similarity_mean']:.3f} |")
        out.append("")
        out.append(f"A `<n>` group mixes {names['fields_per_name_group']:.1f} source fields "
                   f"on average ({names['name_groups']} groups, {names['source_fields']} "
                   "fields). Copies within a `<n>` group match each other no better than "
                   "copies across groups, while copies linked to one field match far better. "
                   "`leukodiff.data.sources.kbc.source_cell_key` therefore groups nothing; "
                   "the evaluation groups KBC by its linked BCCD field (same key as the "
                   "BCCD cell, `bccd:BloodImage_NNNNN`).")
        out.append("")
    out.append(
        "**Matcher** (`leukodiff.evaluation.provenance`): the white cell is the densest "
        "patch of nucleus stain (blue well above red and green), refined by mean shift; its "
        "descriptor is a 24 x 24 RGB patch of 112 px around it (at KBC scale), band-passed, "
        "inside a disc, mean-removed and unit-norm (cosine = normalised cross-correlation). "
        "Each BCCD white-cell box gives 108 templates: 4 flips x 9 angles (-20..20 degrees) "
        "x 3 zooms (0.92, 1, 1.08). TEST_SIMPLE originals are matched whole (thumbnail "
        "correlation); a TRAIN image is assigned among the fields `labels.csv` gives its "
        "class alone, less the TEST_SIMPLE fields, with no field taking more than its share "
        "(the generator drew each source cell equally often; optimal assignment, "
        f"capacity {prov.get('capacity_per_field', {})}).")
    out.append("")
    syn = prov.get("synthetic")
    simple = prov.get("test_simple_exact")
    out.append("| check | result |")
    out.append("|---|---|")
    if syn:
        out.append(f"| synthetic KBC-like copies of BCCD fields ({syn['copies']}, known "
                   f"source), unconstrained matcher | {pct(syn['accuracy'])}% right; "
                   f"{pct(syn['accuracy_at_margin'])}% right on the "
                   f"{pct(syn['coverage_at_margin'])}% with margin >= "
                   f"{prov['thresholds']['min_margin']} |")
    if simple:
        out.append(f"| TEST_SIMPLE originals ({simple['images']}): exact whole-image match | "
                   f"min correlation {simple['exact_score_min']:.4f}; patch matcher agrees on "
                   f"{pct(simple['patch_matcher_agrees'])}%; {simple['same_field_twice']} "
                   "field(s) appear twice |")
    for subset, v in prov["subsets"].items():
        out.append(f"| {subset}: images linked confidently (score >= "
                   f"{prov['thresholds']['min_score']}, margin >= "
                   f"{prov['thresholds']['min_margin']}) | {v['confident']} / {v['images']} "
                   f"({pct(v['coverage'])}%); all others get their best match |")
        out.append(f"| {subset}: unconstrained match's BCCD label = KBC folder | "
                   f"{pct(v['free_label_agreement'])}% |")
        out.append(f"| {subset}: unconstrained match = final (label-constrained) match | "
                   f"{pct(v['free_equals_final'])}% |")
    out.append(f"| BCCD fields in both TRAIN and TEST_SIMPLE | "
               f"{len(prov['fields_in_train_and_test_simple'])} |")
    out.append("")
    train = prov["subsets"].get("TRAIN")
    if train:
        out.append("Per class (TRAIN): source fields found and copies per field "
                   "(the generator made about 2,500 / cells copies of each):")
        out.append("")
        out.append("| class | images | `<n>` groups (= cells the generator had) | fields "
                   "linked | copies per field min / median / max | label agreement |")
        out.append("|---|---|---|---|---|---|")
        for c, v in train["per_class"].items():
            out.append(f"| {c} | {v['images']} | {v['name_groups']} | {v['fields']} | "
                       f"{v['copies_min']} / {v['copies_median']:.0f} / {v['copies_max']} | "
                       f"{pct(v['free_label_agreement'])}% |")
    return "\n".join(out)


def cross_section(cross: CrossSource) -> str:
    sizes = cross.sizes
    out = [
        f"Frozen base, one head per group trained on all of one source, tested on another "
        f"(true group given; one training run per variant, seed as below). Crops at "
        f"{cross.crop_scale} x the cell box (BCCD boxes; KBC: located cell), PBC whole "
        f"images, 128 x 128. Cells: PBC {sizes['PBC']} "
        f"(four types), BCCD {sizes['BCCD']} typed boxes, KBC TEST_SIMPLE "
        f"{sizes['KBC TEST_SIMPLE']}, KBC TRAIN {sizes['KBC TRAIN']}. Variants: "
        "*stain augmentation* adds colour-jittered copies of the training images; *colour "
        "normalisation* maps every image's RGB channels to one mean and spread (train and "
        "test); *feature standardisation* z-scores each source's backbone features with "
        "that source's own mean and std (label-free; it uses the test source's images).",
        "",
    ]
    variants = cross.variants
    directions = list(next(iter(variants.values())).keys())
    out.append("Accuracy of the two-level answer (%), and per class recall / F1:")
    out.append("")
    out.append("| variant | " + " | ".join(directions) + " |")
    out.append("|---|" + "---|" * len(directions))
    for variant, d in variants.items():
        out.append(f"| {variant} | " + " | ".join(
            pct(d[x].two_level.accuracy) for x in directions) + " |")
    out.append("")
    for direction in directions:
        out.append(f"**{direction}** (recall / F1, %):")
        out.append("")
        out.append("| class | " + " | ".join(variants) + " |")
        out.append("|---|" + "---|" * len(variants))
        for c in PAPER_CLASSES:
            cells = []
            for variant in variants:
                pc = variants[variant][direction].per_class.get(c)
                cells.append(f"{pct(pc.recall, 0)} / {pct(pc.f1, 0)}" if pc else "-")
            out.append(f"| {c} | " + " | ".join(cells) + " |")
        out.append("")
    closing = []
    for direction in directions:
        base = variants["none"][direction].two_level.accuracy
        best = max(variants, key=lambda v: variants[v][direction].two_level.accuracy)
        best_accuracy = variants[best][direction].two_level.accuracy
        closing.append(f"{direction}: {pct(base)}% -> {pct(best_accuracy)}% with {best}")
    out.append("What closes the gap most, per direction: " + "; ".join(closing) + ". None of "
               "them comes near the within-source figures: a model trained on one lab's "
               "smears does not transfer as is.")
    out.append("")
    out.append("Within the BCCD/KBC family (frozen, no colour handling): a model trained on "
               "KBC TRAIN, tested on cells it has or has not seen copies of. Provenance "
               "tells them apart:")
    out.append("")
    out.append("| test | n | two-level accuracy | L/M accuracy | N/E accuracy |")
    out.append("|---|---|---|---|---|")
    for name, v in cross.within_family.items():
        tasks = v.tasks
        out.append(f"| {name} | {v.two_level.n} | {pct(v.two_level.accuracy)} | "
                   f"{pct(tasks['mononuclear'].accuracy)} | "
                   f"{pct(tasks['polymorphonuclear'].accuracy)} |")
    out.append("")
    out.append(f"Command: `{COMMAND}` (section 4: `protocols.cross_source`).")
    return "\n".join(out)


def end_to_end_section(end_to_end: EndToEnd, detector: dict, fair: dict | None = None) -> str:
    """The shipped pipeline on BCCD's VOC test list: found, rightly typed, counted."""
    lines = ["The shipped models (`leukodiff/models/weights`), no oracle: level 1 finds each "
             "cell and its group, level 2 names it. A labelled cell counts as found when a "
             "detection overlaps it with IoU >= 0.5 (`leukodiff evaluate pipeline`).", "",
             "| true type | cells (single-WBC fields) | found | right type | accuracy |",
             "|---|---|---|---|---|"]
    part = end_to_end.single_wbc_fields
    for cell_type, row in part.per_type.items():
        lines.append(f"| {cell_type} | {row.cells} | {row.found} | {row.right} | "
                     f"{100 * row.accuracy:.1f}% |")
    lines.append(f"| **all** | **{part.cells}** | | **{part.right}** | "
                 f"**{100 * part.accuracy:.1f}%** |")
    lines += ["", "Most errors are BCCD eosinophils called neutrophils. The same happens "
              "in a 2-fold CV over BCCD's train+val fields (17 of 66), where the eosinophils "
              "called right show orange-red granules and most of those called wrong show a "
              "3-5-lobed nucleus in pale cytoplasm, as BCCD's neutrophils do; `labels.csv` "
              "types fields, not cells. Picture for a hematologist to judge: "
              "`docs/figures/bccd_eosinophil_review.jpg` "
              "(`experiments/bccd_eosinophil_review.py`)."]
    errors = end_to_end.count_error
    lines += ["", f"White cells counted per field: exact in {errors.exact_fields} of "
              f"{end_to_end.fields} fields, mean absolute error "
              f"{errors.mean_absolute:.2f} cells (BCCD leaves some white cells unboxed)."]
    if detector:
        wbc, matched = detector["wbc"], detector["matched"]
        lines += ["", f"Detector on the same fields (`leukodiff evaluate detector`): WBC AP50 "
                  f"{wbc['ap50']:.3f}, AP50:95 {wbc['ap50_95']:.3f}, recall "
                  f"{wbc['recall']:.2f} / precision {wbc['precision']:.2f} at score 0.5; "
                  f"group accuracy of matched cells {100 * matched['group_accuracy']:.1f}%, "
                  f"mononuclear recall {100 * matched['mononuclear_recall']:.0f}%."]
    if fair:
        lines += ["", f"BCCD shows some white cells without a box (8 found by review, 5 in "
                  f"test fields; `leukodiff/data/sources/bccd_unboxed.csv`). With those as "
                  f"ignore regions (COCO crowd): AP50 {fair['wbc']['ap50']:.3f}, AP50:95 "
                  f"{fair['wbc']['ap50_95']:.3f}, precision {fair['wbc']['precision']:.2f} "
                  f"({fair['wbc']['ignored']} detections on unboxed cells ignored)."]
    return "\n".join(lines)


def flat_section(comparisons: dict[str, FlatVsTwoLevel], cfg: dict) -> str:
    out = [
        "The paper's central claim is that two levels beat one. Same splits, same frozen "
        "base and head recipe: a flat head over all classes against one head per group, "
        "where each test cell goes to its **true** group's head (an oracle level 1: a real "
        "detector can only lose accuracy here). McNemar's exact test per split on the cells "
        "exactly one of them gets right, and pooled over splits (test sets overlap between "
        "repeats, and a KBC test set holds many copies of each cell, so McNemar's p is "
        "optimistic there), and Wilcoxon's signed-rank test over the "
        f"{cfg['repeats']} paired accuracies. Parameters: Keras-style counts (Table 2).",
        "",
        "| data, splits | flat acc | two-level acc | flat macro-F1 | two-level macro-F1 | "
        "flat only right | two-level only right | McNemar p (pooled) | splits with p < 0.05 "
        "| Wilcoxon p | parameters flat / two-level (trainable) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in comparisons.items():
        s = c.summary
        p = c.parameters
        out.append(
            f"| {name} | {pm(s.a.accuracy)} | {pm(s.b.accuracy)} | "
            f"{pm(s.a.macro_f1)} | {pm(s.b.macro_f1)} | "
            f"{s.mcnemar_pooled.a_only} | {s.mcnemar_pooled.b_only} | "
            f"{p_value(s.mcnemar_pooled.p)} | {s.splits_p_below_0_05} / "
            f"{len(s.mcnemar_split_p)} | {p_value(s.wilcoxon_p)} | "
            f"{p.flat.total:,} ({p.flat.trainable:,}) / "
            f"{p.two_level.total:,} ({p.two_level.trainable:,}) |")
    out.append("")
    out.append("The two-level numbers are given the true group; a flat model given the same "
               "oracle (its answer among the true group's classes, from the same logits) "
               "separates what the hierarchy adds from what the oracle adds:")
    out.append("")
    out.append("| data, splits | flat + true group acc | two-level acc | flat + true group "
               "macro-F1 | two-level macro-F1 | McNemar p (pooled) | splits with p < 0.05 | "
               "Wilcoxon p |")
    out.append("|---|---|---|---|---|---|---|---|")
    for name, c in comparisons.items():
        s = c.oracle_flat_vs_two_level
        out.append(
            f"| {name} | {pm(s.a.accuracy)} | {pm(s.b.accuracy)} | "
            f"{pm(s.a.macro_f1)} | {pm(s.b.macro_f1)} | "
            f"{p_value(s.mcnemar_pooled.p)} | {s.splits_p_below_0_05} / "
            f"{len(s.mcnemar_split_p)} | {p_value(s.wilcoxon_p)} |")
    out.append("")
    verdicts = []
    for name, c in comparisons.items():
        o = c.oracle_flat_vs_two_level
        diff = o.b.accuracy[0] - o.a.accuracy[0]
        if o.wilcoxon_p >= 0.05:
            verdicts.append(f"{name}: no significant difference ({diff:+.2f} points)")
        else:
            better = "two-level" if diff > 0 else "flat + true group"
            verdicts.append(f"{name}: {better} better by {abs(diff):.2f} points "
                            f"(Wilcoxon {p_is(o.wilcoxon_p)})")
    out.append("Against the flat model given the same true group: " + "; ".join(verdicts)
               + ". The two-level scheme's lead over the plain flat model is what the given "
               "group is worth, not what the hierarchy adds; with a real level 1, the "
               "two-level result is bounded by the level-1 accuracy.")
    out.append("")
    out.append("Classes: KBC lymphocyte, monocyte, neutrophil, eosinophil; PBC adds basophil "
               "(two-level: lymphocyte/monocyte and neutrophil/eosinophil/basophil). The "
               "two-level scheme has two bases (it doubles the parameters) and needs a level "
               "1 that this comparison does not charge it for.")
    out.append("")
    out.append(f"Command: `{COMMAND}` (section 5: `protocols.flat_vs_two_level`).")
    return "\n".join(out)
