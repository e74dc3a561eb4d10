"""The one training engine: what every loop here shares, written once.

Seeding, the learning-rate shape, a run's folder (refuse an occupied one, resume an
interrupted one, `last.pt` and `best.pt`), a mean of the last epochs' weights
(`WeightAverage`), the optimiser step, an epoch of steps with
its progress bar, and the epochs themselves (validate, keep the best, checkpoint, stop
at a time limit). The level-2 classifier, the detector, its group classifier, the
adaptation loops and the protocol heads train through it, and the benchmarks time it.

A loop gives only what is its own: its batches, the loss of a batch, how it validates
and what it logs:

    folder = RunFolder(out_dir, resume=resume, error=TrainingError, config=asdict(config))
    step = Step(optimizer, scheduler)
    state = folder.resume(model, optimizer, scheduler, generator) if resume else new_state()
    finished = run_epochs(
        epochs, state,
        epoch=lambda n: train_epoch(model, loader, loss_of, step),  # -> its record
        validate=lambda n, record: score,  # a tuple, greater is better; None: not this epoch
        keep_best=lambda: folder.save_best(model),  # or KeptBest(model): in memory
        save_last=lambda state: folder.save_last(model, optimizer, scheduler, generator,
                                                 state),
        describe=lambda record, best: f"epoch {record['epoch']} ...", log=log)

A crop classifier's loop (level 2, its adaptation, the group classifier) takes its
`epoch` from `classifier_epochs`: the step and the classification loss, set up once.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from leukodiff.data.scan import Track, no_progress

Score = tuple[float, ...]
#: The loss of one batch, and the number of samples it stands for (the weight of its
#: loss in the epoch's mean), and optionally its named parts (summed into `loss`).
BatchLoss = tuple[torch.Tensor, int] | tuple[torch.Tensor, int, dict[str, torch.Tensor]]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over `warmup` steps, then cosine decay to zero.

    Full-network Adam at lr 1e-3 from ImageNet weights can collapse to a
    constant output in its first steps; the warm-up prevents that.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def new_state() -> dict:
    """A run before its first epoch: what `fit` updates and `RunFolder` checkpoints."""
    return {"epoch": 0, "best_score": [-1.0, -math.inf], "best_epoch": 0, "history": [],
            "seconds": 0.0}


def save_atomic(obj: Any, path: Path) -> None:
    """`torch.save` through a temporary file, so a kill never leaves half a file."""
    partial = path.with_suffix(".tmp")
    torch.save(obj, partial)
    partial.replace(path)


class RunFolder:
    """A training run's folder: `last.pt` (everything needed to resume, every epoch) and
    `best.pt` (the best epoch's weights).

    A folder holding another run is refused unless it is resumed, and one holding the
    run's `finished` file (e.g. `detector.pt`) is refused always: nothing a user made is
    overwritten. `config` is the run's configuration; a resume with another is refused.
    """

    def __init__(self, out_dir: Path, *, resume: bool, error: Callable[[str], Exception],
                 config: dict, finished: str | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.last = self.out_dir / "last.pt"
        self.best = self.out_dir / "best.pt"
        self.error = error
        self.config = config
        if self.last.exists() and not resume:
            raise error(f"{self.out_dir} already holds a run; pass --resume to continue it "
                        "or choose another output folder")
        if resume and not self.last.exists():
            raise error(f"nothing to resume: {self.last} does not exist")
        if finished and (self.out_dir / finished).exists():
            raise error(f"{self.out_dir} holds a finished run ({finished})")
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def save_last(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: Any, generator: torch.Generator, state: dict) -> None:
        """Everything needed to resume, written atomically so a kill never leaves half a
        file. `scheduler` None: a constant learning rate (adaptation)."""
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": None if scheduler is None else scheduler.state_dict(),
                     "generator": generator.get_state(),
                     "torch_rng": torch.get_rng_state(), "state": state,
                     "config": self.config}, self.last)

    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Any, generator: torch.Generator) -> dict:
        """Restore the run `save_last` wrote; refuses one made with another configuration."""
        checkpoint = torch.load(self.last, map_location="cpu", weights_only=False)
        if checkpoint["config"] != self.config:
            saved = checkpoint["config"]
            differ = sorted(k for k in {*saved, *self.config} if saved.get(k) != self.config.get(k))
            raise self.error(f"{self.last} was made with another configuration (differs in: "
                             f"{', '.join(differ)})")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
        generator.set_state(checkpoint["generator"])
        torch.set_rng_state(checkpoint["torch_rng"])
        return checkpoint["state"]

    def save_best(self, model: torch.nn.Module) -> None:
        torch.save(model.state_dict(), self.best)

    def load_best(self, model: torch.nn.Module, device: torch.device | str = "cpu") -> None:
        model.load_state_dict(torch.load(self.best, map_location=device, weights_only=True))


class KeptBest:
    """The best epoch's weights of a module, kept in memory (loops too short to
    checkpoint: the group classifier, adaptation)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.state: dict[str, torch.Tensor] | None = None

    def __call__(self) -> None:
        self.state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def restore(self) -> None:
        if self.state is not None:
            self.module.load_state_dict(self.state)


class WeightAverage:
    """The running mean of a model's weights and buffers over its last epochs (torch's
    AveragedModel), kept in `path` after each so that a resumed run goes on with it; a
    resume whose average is missing or short is refused rather than averaged anew."""

    def __init__(self, model: torch.nn.Module, path: Path, first: int, done: int, *,
                 error: Callable[[str], Exception]) -> None:
        """Epochs after `first` are averaged; `done` epochs were trained before (resume)."""
        self.path = path
        self.averaged = AveragedModel(model, use_buffers=True)
        self.epochs: list[int] = []
        expected = list(range(first + 1, done + 1))
        if done and path.exists():  # a new run starts a new average
            saved = torch.load(path, map_location="cpu", weights_only=True)
            self.averaged.load_state_dict(saved["average"])
            self.epochs = list(saved["epochs"])
        # one epoch more than `done`: stopped between this file and last.pt; that epoch is
        # trained again and its first weights stay in the mean
        if self.epochs[:len(expected)] != expected:
            raise error(f"{path} should hold the mean of epochs {expected} to resume, but "
                        f"holds {self.epochs or 'nothing'}: train again in a new folder")

    def add(self, model: torch.nn.Module, epoch: int) -> None:
        if epoch in self.epochs:
            return
        self.averaged.update_parameters(model)
        self.epochs.append(epoch)
        save_atomic({"average": self.averaged.state_dict(), "epochs": self.epochs}, self.path)

    def state_dict(self) -> dict:
        return self.averaged.module.state_dict()


class Step:
    """The optimiser step every loop takes: zero the gradients, back-propagate, clip the
    gradient norm (when `clip_norm`), step, then advance the schedule (when given)."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any = None,
                 clip_norm: float | None = None) -> None:
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.clip_norm = clip_norm
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

    def __call__(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()


def classification_loss(model: torch.nn.Module, loss_fn: Callable, *,
                        device: torch.device | None = None, channels_last: bool = True
                        ) -> Callable[[tuple[torch.Tensor, torch.Tensor]], BatchLoss]:
    """The loss of a batch (inputs, targets) of a classifier; image batches go in
    channels-last (the layout the MobileNets train fastest in) unless told not to."""

    def loss_of(batch: tuple[torch.Tensor, torch.Tensor]) -> BatchLoss:
        inputs, targets = batch
        if device is not None:
            inputs, targets = inputs.to(device), targets.to(device)
        if channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return loss_fn(model(inputs), targets), len(targets)

    return loss_of


def classifier_epochs(model: torch.nn.Module, batches: Iterable, loss_fn: Callable,
                      optimizer: torch.optim.Optimizer, scheduler: Any = None, *,
                      description: Callable[[int], str], track: Track = no_progress,
                      device: torch.device | None = None, channels_last: bool = True
                      ) -> Callable[[int], dict]:
    """The epoch of every crop-classifier loop (level 2, its adaptation, the detector's
    group classifier): `train_epoch` over `batches` with `classification_loss` and the
    optimiser `Step`; called with the epoch's number, it returns `train_epoch`'s record."""
    step = Step(optimizer, scheduler)
    loss_of = classification_loss(model, loss_fn, device=device, channels_last=channels_last)
    return lambda number: train_epoch(model, batches, loss_of, step, track=track,
                                      description=description(number))


def train_epoch(module: torch.nn.Module, batches: Iterable, loss_of: Callable[[Any], BatchLoss],
                step: Step, *, track: Track = no_progress, description: str = "") -> dict:
    """One epoch of optimiser steps over `batches` (with a progress bar): the mean of the
    loss and of each of its parts, weighted by the samples of each batch, its seconds,
    and the samples seen."""
    module.train()
    started = time.perf_counter()
    sums: dict[str, float] = {}
    seen = 0
    for batch in track(batches, description):
        loss, weight, *rest = loss_of(batch)
        step(loss)
        for name, value in (rest[0] if rest else {}).items():
            sums[name] = sums.get(name, 0.0) + float(value.detach()) * weight
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * weight
        seen += weight
    return {**{name: total / max(1, seen) for name, total in sums.items()},
            "seconds": time.perf_counter() - started, "samples": seen}


def run_epochs(epochs: int, state: dict, *, epoch: Callable[[int], dict],
        validate: Callable[[int, dict], Score | None], keep_best: Callable[[], None],
        describe: Callable[[dict, bool], str],
        save_last: Callable[[dict], None] | None = None,
        log: Callable[[str], None] = lambda message: None,
        time_limit_minutes: float | None = None, started: float | None = None) -> bool:
    """Epochs `state["epoch"] + 1` to `epochs`: train one (`epoch` returns its record),
    `validate` it (adds its figures to the record; returns its score, or None when this
    epoch is not validated), `keep_best` when the score beats every earlier one (ties
    keep the earlier epoch), `save_last`, then log `describe(record, best)`.

    With `time_limit_minutes` (counted from `started`), stops cleanly after the epoch
    that crosses it and returns False: resuming goes on. True when every epoch is done.
    """
    started = time.perf_counter() if started is None else started
    for number in range(state["epoch"] + 1, epochs + 1):
        began = time.perf_counter()
        record = {"epoch": number, **epoch(number)}
        score = validate(number, record)
        best = score is not None and tuple(state["best_score"]) < tuple(score)
        if best:
            state.update(best_score=list(score), best_epoch=number)
            keep_best()
        state["history"].append(record)
        state["epoch"] = number
        state["seconds"] = state.get("seconds", 0.0) + time.perf_counter() - began
        if save_last is not None:
            save_last(state)
        log(describe(record, best))
        elapsed = (time.perf_counter() - started) / 60
        if time_limit_minutes is not None and elapsed > time_limit_minutes and number < epochs:
            log(f"time limit reached after epoch {number}; resume to go on")
            return False
    return True
