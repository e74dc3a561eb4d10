"""Training cost on this CPU: seconds per epoch, from a few timed steps of the real loops.

Whole epochs would take most of the run, so each mode times a few steps of the
project's own training pieces (`leukodiff.training.*`: model builders, datasets,
augmentation, optimisers) after one warm-up step and extrapolates to an epoch
with the data sizes the shipped models' manifests report (what `prepare` /
`prepare_fields` counted when they were trained). Pixels are random for the
level-2 models (augmentation and convolutions cost the same on any content);
the detector steps run on the real BCCD training fields.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from itertools import islice
from typing import Any

from benchmarks.systems import set_torch_threads, weights_dir


def _manifest(name: str) -> dict:
    return json.loads((weights_dir() / f"{name}.json").read_text())


def _part_size(counts: dict, part: str) -> int:
    return sum(counts.get(part, {}).values())


def _classifier_model(config: Any) -> tuple[Any, str]:
    """`build_model` with the ImageNet base, or the same network untrained if weights are absent."""
    import torch

    from leukodiff.models.mobilenet import MobileNetClassifier
    from leukodiff.models.tflite import WeightsNotFoundError
    from leukodiff.training.classifier import build_model

    try:
        return build_model(config), "ImageNet base"
    except WeightsNotFoundError:
        model = MobileNetClassifier(num_classes=len(config.class_names()), width=config.width)
        if config.mode == "frozen":
            model.freeze_backbone()
        else:
            model.unfreeze_backbone(train_batchnorm=False)
        return model.to(memory_format=torch.channels_last), "untrained base (no TFLite weights)"


def finetune_steps(model: Any, batch_size: int, input_size: int, classes: int, steps: int,
                   lr: float) -> float:
    """Seconds per optimiser step of the fine-tuning loop (augmenting loader included):
    `training.engine.train_epoch` over `steps` batches, after one warm-up batch."""
    import torch
    from torch.utils.data import DataLoader

    from leukodiff.training.cells import CellTensorDataset, training_augmentation
    from leukodiff.training.engine import Step, classification_loss, train_epoch

    count = batch_size * (steps + 1)
    images = torch.randint(0, 256, (count, 3, input_size, input_size), dtype=torch.uint8)
    targets = torch.randint(0, classes, (count,))
    loader = DataLoader(CellTensorDataset(images, targets, training_augmentation(input_size)),
                        batch_size=batch_size, shuffle=True, drop_last=True)
    params = [p for p in model.parameters() if p.requires_grad]
    step = Step(torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-7))
    loss_of = classification_loss(model, torch.nn.CrossEntropyLoss())
    batches = iter(loader)
    train_epoch(model, islice(batches, 1), loss_of, step)  # the first step is warm-up
    return train_epoch(model, islice(batches, steps), loss_of, step)["seconds"] / steps


def inference_s_per_image(model: Any, input_size: int, count: int = 128) -> float:
    """Seconds per image of `predict_logits` (validation passes)."""
    import torch

    from leukodiff.training.classifier import predict_logits

    images = torch.randint(0, 256, (count, 3, input_size, input_size), dtype=torch.uint8)
    predict_logits(model, images[:16])
    start = time.perf_counter()
    predict_logits(model, images)
    return (time.perf_counter() - start) / count


def classifier_cost(task: str, mode: str, steps: int) -> dict:
    """One level-2 model, frozen (cached features, head only) or fine-tuned."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from leukodiff.training.classifier import (
        ClassifierConfig,
        class_weights,
        paper_adam,
        pooled_features,
    )
    from leukodiff.training.engine import Step, classification_loss, train_epoch

    shipped = _manifest(task)["training"]
    config = ClassifierConfig(task=task, mode=mode, batch_size=shipped["batch_size"],
                              width=shipped["width"], input_size=shipped["input_size"])
    train_n, val_n = _part_size(shipped["cells"], "train"), _part_size(shipped["cells"], "val")
    classes = len(config.class_names())
    model, base = _classifier_model(config)
    size, batch = config.input_size, config.batch_size
    out: dict[str, Any] = {"task": task, "mode": mode, "train_cells": train_n,
                           "val_cells": val_n, "batch_size": batch, "base": base,
                           "epochs_shipped_config": shipped["epochs"]}
    if mode == shipped["mode"]:
        out["recorded_epoch_s"] = _recorded(shipped)
    if mode == "frozen":
        sample = torch.randint(0, 256, (256, 3, size, size), dtype=torch.uint8)
        pooled_features(model, sample[:32])
        start = time.perf_counter()
        features = pooled_features(model, sample)
        per_image = (time.perf_counter() - start) / len(sample)
        cache = cycle_rows(features, train_n)
        targets = torch.randint(0, classes, (train_n,))
        loader = DataLoader(TensorDataset(cache, targets), batch_size=batch, shuffle=True,
                            drop_last=train_n > batch)
        step = Step(paper_adam(model.head.parameters(), config))
        loss_fn = torch.nn.CrossEntropyLoss(weight=class_weights(targets, classes))
        start = time.perf_counter()
        # one whole epoch: measured, not extrapolated
        train_epoch(model.head, loader, classification_loss(model.head, loss_fn), step)
        with torch.inference_mode():
            model.head.eval()
            model.head(cycle_rows(features, val_n))
        out.update(epoch_s=time.perf_counter() - start, extrapolated=False,
                   feature_cache_s=per_image * (train_n + val_n),
                   feature_cache_extrapolated=True)
    else:
        step = finetune_steps(model, batch, size, classes, steps, config.lr)
        steps_per_epoch = train_n // batch if train_n > batch else 1
        val_s = inference_s_per_image(model, size) * val_n
        out.update(step_s=step, steps_per_epoch=steps_per_epoch, timed_steps=steps,
                   epoch_s=step * steps_per_epoch + val_s, val_s=val_s, extrapolated=True)
    return out


def _recorded(training: dict) -> float | None:
    """Median epoch seconds in the shipped model's own training history (its machine)."""
    seconds = [h["seconds"] for h in training.get("history", []) if "seconds" in h]
    return statistics.median(seconds) if seconds else None


def cycle_rows(tensor: Any, count: int) -> Any:
    """`count` rows of `tensor`, repeated in order (a feature cache of the real size)."""
    repeats = math.ceil(count / len(tensor))
    return tensor.repeat(repeats, 1)[:count].clone()


def detector_cost(steps: int, data_root: str | None) -> dict:
    """The level-1 Faster R-CNN loop (shipped config) and its group-classifier phase."""
    import torch

    from leukodiff.models.detector import build_detector
    from leukodiff.training.detector import (
        Augmenter,
        DetectorConfig,
        FieldImages,
        detector_step,
        epoch_order,
        field_batch_loss,
        prepare_fields,
        validate,
    )
    from leukodiff.training.engine import train_epoch

    shipped = _manifest("detector")["training"]
    config = DetectorConfig.from_dict(shipped)
    data = prepare_fields(config, data_root)
    model = build_detector(config.spec, pretrained=False, frozen_blocks=config.frozen_blocks)
    # Start from the shipped weights (as `init_weights` fine-tuning does): proposals and
    # validation then cost what they cost for a trained model, not an untrained one.
    model.load_state_dict(torch.load(weights_dir() / "detector.pt", map_location="cpu",
                                     weights_only=True))
    val_fields = min(len(data.val), 8)
    validate(model, data.val[:1], refine=False)
    start = time.perf_counter()
    validate(model, data.val[:val_fields], refine=False)
    val_s = (time.perf_counter() - start) / val_fields * len(data.val)
    images = FieldImages(data.train)
    start = time.perf_counter()
    for index in range(len(images)):  # decoded once per run, then kept in memory
        images.image(index)
    decode_s = time.perf_counter() - start
    augment = Augmenter(config, images)
    generator = torch.Generator().manual_seed(0)
    order = epoch_order(data.train, config.mono_oversample, generator)
    batches = [order[s:s + config.batch_size] for s in range(0, len(order), config.batch_size)]
    step = detector_step(model, config, len(batches) * config.epochs)
    loss_of = field_batch_loss(model, augment, config.scale_range, torch.device("cpu"))
    train_epoch(model, batches[:1], loss_of, step)  # the first step is warm-up
    step_s = train_epoch(model, batches[1:steps + 1], loss_of, step)["seconds"] / steps
    out: dict[str, Any] = {
        "train_fields": len(data.train), "fields_per_epoch": len(order),
        "batch_size": config.batch_size, "steps_per_epoch": len(batches), "timed_steps": steps,
        "step_s": step_s, "epoch_s": step_s * len(batches), "val_s": val_s,
        "val_every": config.val_every, "val_fields": len(data.val), "decode_once_s": decode_s,
        "epochs_shipped_config": config.epochs, "weights": "shipped detector.pt (fine-tuning)",
        "extrapolated": True, "recorded_epoch_s": _recorded(shipped),
        "recorded_device": shipped.get("device", "not recorded")}
    group = shipped.get("group_classifier", {}).get("cells", {})
    if hasattr(model, "group_classifier") and group:
        cells = group.get("bccd train", 0) * config.group_bccd_repeat + group.get("pbc", 0)
        gstep = finetune_steps(model.group_classifier, config.group_batch_size,
                               config.spec.group_input_size, 2, steps, config.group_lr)
        gsteps = cells // config.group_batch_size
        out["group_classifier"] = {
            "cells_per_epoch": cells, "batch_size": config.group_batch_size, "step_s": gstep,
            "steps_per_epoch": gsteps, "epoch_s": gstep * gsteps,
            "epochs_shipped_config": config.group_epochs, "extrapolated": True}
    return out


def training(spec: dict) -> dict:
    set_torch_threads(spec["threads"])
    if spec["item"] == "detector":
        return detector_cost(spec["steps"], spec.get("data_root"))
    return classifier_cost(spec["task"], spec["mode"], spec["steps"])
