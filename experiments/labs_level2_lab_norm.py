"""Does normalising a new lab's activations to the training labs' (test-time
normalisation, as AdaBN) make level 2 work on a lab it never saw?

    python experiments/labs_level2_lab_norm.py runs/labs-l2-w050   # ~10 min on 2 cores

The fold models come from `experiments/labs_level2_backbone.py 0.5 RUNS` (the shipped
width and recipe, leave one lab out). For each fold and group model, every BatchNorm
layer's input is measured per channel (mean, sd) on the training labs' cells (at most
300 per type and lab, cut as the model's manifest says) and on the held-out lab's cells
of that group (no label used); the layer then maps the new lab's statistics onto the
training labs' (x - mu_new) / sd_new * sd_train + mu_train, written into BatchNorm's
running mean and variance, so the result is an ordinary model (ONNX exports it as
is); near-constant channels are held back (sd floor 5% of the layer's median, ratio
within 1/4..4: checked on a colour-shifted copy of training cells, before any fold).
Each layer's new-lab statistics are taken after the layers before it are mapped. The
whole held-out lab is one batch here: in use, a batch of a lab's slides.
Measured: 5-type accuracy and macro-F1 on the held-out lab's true cells, true
group given, with and without the mapping; rule fixed before any fold was measured.

Result (2026-12-06, seed 0, fold models `labs_level2_backbone.py 0.5 runs/labs-l2-w050`,
one CPU thread; level-2 macro-F1 on the held-out lab, accuracy in brackets):

    held out    as trained      lab-normalised
    BCCD        0.757 (79.3%)   0.589 (58.1%)
    PBC         0.408 (50.3%)   0.505 (51.2%)
    Chula       0.782 (78.4%)   0.806 (81.3%)
    mean        0.649           0.633

Not kept: better on PBC (+0.10; eosinophils 4% -> 36%, basophils 0% -> 19%, but
lymphocytes 100% -> 78%) and Chula (+0.02), worse on BCCD (-0.17; neutrophils 78% ->
48%). Moment matching assumes the new lab's cells come in the training labs' mix of
types; BCCD's polymorphonuclear cells are mostly neutrophils, the training sample is
balanced, so the mapping pushes neutrophils toward the rarer types. What would be
needed: statistics weighted by the predicted type (or an EM over the class mix, as
Saerens et al. 2002 re-estimate priors), and per-slide batches large enough to hold
them. The check on a colour-shifted copy of training cells (plain 99.2% agreement,
mapped 100%) shows the mapping itself does what it should.
"""

from __future__ import annotations

import contextlib
import random
import sys
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from torch import nn

from leukodiff.data.crops import cell_input
from leukodiff.data.sources import load_cells
from leukodiff.evaluation.labs import TYPED_LABS, TYPES, available_labs
from leukodiff.metrics.classification import classification_metrics
from leukodiff.models.io import load_classifier
from leukodiff.taxonomy import GROUP_OF, Group

PER_TYPE = 300
torch.set_grad_enabled(False)


def crops(model_manifest, cells) -> torch.Tensor:
    geometry = model_manifest.input
    batch = np.stack([np.asarray(cell_input(c, geometry.crop_scale, geometry.size,
                                            geometry.stain)) for c in cells])
    return torch.from_numpy(batch.transpose(0, 3, 1, 2).astype(np.float32) / 255)


class _Enough(Exception):
    """Stops a forward pass once the layer being measured has been seen."""


def bn_input_stats(model: nn.Module, images: torch.Tensor, only: int | None = None
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per BatchNorm layer, the mean and sd of its input per channel over `images`
    (`only`: that layer alone, the forward pass stopped there)."""
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    wanted = range(len(layers)) if only is None else [only]
    sums: dict[int, tuple] = {}

    def hook(index):
        def record(module, inputs):
            x = inputs[0].double()
            part = (x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), x.numel() / x.shape[1])
            sums[index] = part if index not in sums else tuple(
                a + b for a, b in zip(sums[index], part, strict=True))
            if only is not None:
                raise _Enough
        return record

    handles = [layers[i].register_forward_pre_hook(hook(i)) for i in wanted]
    model.eval()
    for start in range(0, len(images), 64):
        with contextlib.suppress(_Enough):
            model(images[start:start + 64])
    for handle in handles:
        handle.remove()
    stats = []
    for index in wanted:
        total, squares, count = sums[index]
        mean = total / count
        stats.append((mean.float(), (squares / count - mean * mean).clamp(min=1e-10)
                      .sqrt().float()))
    return stats


def map_onto(model: nn.Module, source, images: torch.Tensor) -> None:
    """Set each BatchNorm, first to last, so the new lab's statistics at its input (with
    the layers before it already mapped) become the source's."""
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for index, (layer, (mu_s, sd_s)) in enumerate(zip(layers, source, strict=True)):
        mu_t, sd_t = bn_input_stats(model, images, only=index)[0]
        # BN(x) = w (x - rm) / sqrt(rv + eps) + b applied to x' = (x - mu_t) sd_s / sd_t
        # + mu_s: rm' = mu_t + (rm - mu_s) sd_t / sd_s, sqrt(rv' + eps) =
        # sqrt(rv + eps) sd_t / sd_s. Near-constant channels (dead ReLUs) would give
        # wild ratios: a floor of 5% of the layer's median sd, the ratio within 1/4..4.
        floor = 0.05 * sd_s.median()
        ratio = (sd_t.clamp(min=floor) / sd_s.clamp(min=floor)).clamp(0.25, 4.0)
        mean0, var0 = layer.running_mean.clone(), layer.running_var.clone()
        layer.running_mean.copy_(mu_t + (mean0 - mu_s) * ratio)
        layer.running_var.copy_((var0 + layer.eps) * ratio ** 2 - layer.eps)


def sample(cells, per_type: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    by_type: dict[str, list] = {}
    for cell in cells:
        by_type.setdefault(str(cell.cell_type), []).append(cell)
    return [c for group in by_type.values() for c in rng.sample(group, min(per_type, len(group)))]


runs = Path(sys.argv[1])
console = Console()
present = available_labs(None)
for lab in (x for x in TYPED_LABS if present[x]):
    fold = runs / f"without-{lab}"
    if not (fold / "polymorphonuclear" / "model.pt").exists():
        continue
    sources = [x for x in TYPED_LABS if x != lab and present[x]]
    held = load_cells(lab).records
    training = [c for s in sources for c in sample(load_cells(s).records, PER_TYPE)]
    truth, plain, mapped = [], [], []
    for group in Group:
        model, manifest = load_classifier(fold / group.value / "model.pt")
        mine = [c for c in held if GROUP_OF[c.cell_type] is group]
        theirs = [c for c in training if GROUP_OF[c.cell_type] is group]
        if not mine:
            continue
        new, old = crops(manifest, mine), crops(manifest, theirs)
        classes = list(manifest.classes)
        model.eval()
        before = torch.cat([model(new[i:i + 64]) for i in range(0, len(new), 64)]).argmax(1)
        map_onto(model, bn_input_stats(model, old), new)
        after = torch.cat([model(new[i:i + 64]) for i in range(0, len(new), 64)]).argmax(1)
        truth += [TYPES.index(str(c.cell_type)) for c in mine]
        plain += [TYPES.index(classes[i]) for i in before.tolist()]
        mapped += [TYPES.index(classes[i]) for i in after.tolist()]
    for name, predicted in (("as trained", plain), ("lab-normalised", mapped)):
        m = classification_metrics(truth, predicted, TYPES)
        recall = ", ".join(f"{t} {m['per_class'][t]['recall']:.2f}" for t in TYPES
                           if m["per_class"][t]["support"])
        console.print(f"held out {lab}, {name}: accuracy {m['accuracy']:.3f} macro-F1 "
                      f"{m['macro_f1']:.3f} ({recall})")
