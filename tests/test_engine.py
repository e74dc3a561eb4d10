"""The training engine on a tiny synthetic problem (seconds): an interrupted run resumed
ends with exactly the weights of an uninterrupted one; occupied folders are refused;
the best epoch is kept, ties keeping the earlier; the step clips when told."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from leukodiff.training.engine import (
    KeptBest,
    RunFolder,
    Step,
    classification_loss,
    new_state,
    run_epochs,
    seed_everything,
    train_epoch,
    warmup_cosine,
)


class RunError(RuntimeError):
    pass


@dataclass
class Result:
    finished: bool
    state: dict
    weights: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor]


def run(out_dir: Path, *, epochs: int = 4, resume: bool = False,
        time_limit_minutes: float | None = None, lr: float = 0.1) -> Result:
    """A seeded loop as the project's loops are built: shuffled, augmented (noise drawn from
    torch's global generator), warm-up + cosine schedule, validated, checkpointed."""
    folder = RunFolder(out_dir, resume=resume, error=RunError, config={"lr": lr})
    seed_everything(0)
    inputs = torch.randn(96, 8)
    targets = (inputs[:, 0] + inputs[:, 1] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(inputs[:64], targets[:64]), batch_size=16, shuffle=True,
                        generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_cosine, warmup=len(loader), total=epochs * len(loader)))
    step = Step(optimizer, scheduler, clip_norm=1.0)
    plain = classification_loss(model, torch.nn.functional.cross_entropy)

    def noisy(batch):  # augmentation draws from the global generator, as the real ones do
        x, y = batch
        return plain((x + 0.1 * torch.randn_like(x), y))

    state = folder.resume(model, optimizer, scheduler, generator) if resume else new_state()

    def validate(epoch: int, record: dict) -> tuple[float]:
        with torch.inference_mode():
            model.eval()
            record["val_loss"] = float(torch.nn.functional.cross_entropy(
                model(inputs[64:]), targets[64:]))
        return (-record["val_loss"],)

    finished = run_epochs(
        epochs, state, epoch=lambda n: train_epoch(model, loader, noisy, step),
        validate=validate, keep_best=lambda: folder.save_best(model),
        describe=lambda record, best: f"epoch {record['epoch']}",
        save_last=lambda state: folder.save_last(model, optimizer, scheduler, generator,
                                                 state),
        time_limit_minutes=time_limit_minutes)
    best = torch.load(folder.best, weights_only=True)
    return Result(finished, state, model.state_dict(), best)


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    whole = run(tmp_path / "whole")
    assert whole.finished and whole.state["epoch"] == 4
    cut = run(tmp_path / "cut", time_limit_minutes=0.0)  # stops cleanly after epoch 1
    assert not cut.finished and cut.state["epoch"] == 1
    resumed = run(tmp_path / "cut", resume=True)
    assert resumed.finished
    assert [h["loss"] for h in resumed.state["history"]] == [
        h["loss"] for h in whole.state["history"]]
    assert resumed.state["best_epoch"] == whole.state["best_epoch"]
    for name, value in whole.weights.items():
        assert torch.equal(value, resumed.weights[name]), name
        assert torch.equal(whole.best[name], resumed.best[name]), name
    # the loss fell: the loop learns, so equal weights are not trivially equal
    assert whole.state["history"][-1]["loss"] < whole.state["history"][0]["loss"]


def test_occupied_folders_and_other_configurations_are_refused(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"earlier work")
    with pytest.raises(RunError, match="--resume"):
        RunFolder(tmp_path / "run", resume=False, error=RunError, config={})
    assert (tmp_path / "run" / "last.pt").read_bytes() == b"earlier work"
    with pytest.raises(RunError, match="nothing to resume"):
        RunFolder(tmp_path / "new", resume=True, error=RunError, config={})
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "model.pt").write_bytes(b"finished")
    with pytest.raises(RunError, match="finished run"):
        RunFolder(tmp_path / "done", resume=False, error=RunError, config={},
                  finished="model.pt")
    run(tmp_path / "short", epochs=1)
    with pytest.raises(RunError, match="another configuration"):
        run(tmp_path / "short", epochs=1, resume=True, lr=0.5)


def test_the_best_epoch_is_kept_and_ties_keep_the_earlier() -> None:
    module = torch.nn.Linear(1, 1, bias=False)
    kept = KeptBest(module)
    scores = {1: (0.5,), 2: (0.7,), 3: (0.7,), 4: (0.6,)}

    def epoch(number: int) -> dict:
        with torch.no_grad():
            module.weight.fill_(float(number))
        return {}

    state = new_state()
    run_epochs(4, state, epoch=epoch, validate=lambda n, record: scores[n], keep_best=kept,
               describe=lambda record, best: "")
    assert state["best_epoch"] == 2 and state["best_score"] == [0.7]
    kept.restore()
    assert float(module.weight.detach()) == 2.0
    skipped = new_state()  # epochs not validated (None) are never the best
    run_epochs(2, skipped, epoch=epoch, validate=lambda n, record: None if n == 2 else (0.1,),
               keep_best=kept, describe=lambda record, best: "")
    assert skipped["best_epoch"] == 1 and len(skipped["history"]) == 2


def test_the_step_clips_the_gradient_norm() -> None:
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    Step(optimizer, clip_norm=1.0)((weight * torch.tensor([300.0, 400.0, 0.0])).sum())
    assert torch.allclose(weight.detach(), torch.tensor([-0.6, -0.8, 0.0]))
