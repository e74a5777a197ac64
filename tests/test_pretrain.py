"""The shared pretraining loop: it learns, logs, checkpoints atomically, and resumes to the same weights."""
from __future__ import annotations

import csv
import math

import pytest
import torch
from torch import nn

from bench.errors import CheckpointError
from bench.pretrain import CHECKPOINT_NAME, LOG_NAME, PretrainConfig, generator, pretrain, read_checkpoint

N, D = 96, 6
CONFIG = PretrainConfig(epochs=4, batch_size=16, lr=0.3, weight_decay=0.0, warmup_steps=2, seed=3)


def toy_problem():
    """Logistic regression on a separable problem: the loss must fall."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    y = (x[:, 0] - 0.5 * x[:, 1] > 0).float()
    torch.manual_seed(1)
    model = nn.Linear(D, 1)

    def batches(epoch: int):
        perm = torch.randperm(N, generator=generator(CONFIG.seed, f"shuffle:{epoch}"))
        for s in range(0, N, CONFIG.batch_size):
            idx = perm[s:s + CONFIG.batch_size]
            yield x[idx], y[idx]

    def objective(batch):
        xb, yb = batch
        return {"bce": nn.functional.binary_cross_entropy_with_logits(model(xb)[:, 0], yb)}

    return model, batches, objective


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_loss_falls_and_log_and_checkpoint_are_written(tmp_path):
    model, batches, objective = toy_problem()
    out = pretrain(model, [{"params": list(model.parameters())}], objective, batches, N // CONFIG.batch_size,
                   CONFIG, work_dir=tmp_path, device=torch.device("cpu"), resume=False)
    losses = [row["train_bce"] for row in out.history]
    assert len(losses) == CONFIG.epochs and losses[-1] < 0.6 * losses[0]
    with open(tmp_path / LOG_NAME) as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert math.isclose(float(rows[-1]["train_bce"]), losses[-1], rel_tol=1e-4)
    state = read_checkpoint(tmp_path / CHECKPOINT_NAME)          # weights_only=True inside
    assert state["epoch"] == CONFIG.epochs and state["step"] == out.steps == CONFIG.epochs * (N // CONFIG.batch_size)
    assert not list(tmp_path.glob("*.partial"))


def test_resume_after_an_interruption_ends_with_the_same_weights(tmp_path):
    model, batches, objective = toy_problem()
    pretrain(model, [{"params": list(model.parameters())}], objective, batches, N // CONFIG.batch_size, CONFIG,
             work_dir=tmp_path / "full", device=torch.device("cpu"), resume=False)
    full = weights(model)

    # An interrupted run: epoch 3 dies halfway (after its checkpoint of epoch 2 was written).
    model2, batches2, objective2 = toy_problem()

    def dying(epoch: int):
        for i, b in enumerate(batches2(epoch)):
            if epoch == 3 and i == 2:
                raise KeyboardInterrupt
            yield b

    with pytest.raises(KeyboardInterrupt):
        pretrain(model2, [{"params": list(model2.parameters())}], objective2, dying, N // CONFIG.batch_size, CONFIG,
                 work_dir=tmp_path / "cut", device=torch.device("cpu"), resume=False)
    assert read_checkpoint(tmp_path / "cut" / CHECKPOINT_NAME)["epoch"] == 2

    model3, batches3, objective3 = toy_problem()        # a new process: fresh model, resumes from disk
    out = pretrain(model3, [{"params": list(model3.parameters())}], objective3, batches3, N // CONFIG.batch_size,
                   CONFIG, work_dir=tmp_path / "cut", device=torch.device("cpu"), resume=True)
    assert out.resumed_from_epoch == 2 and len(out.history) == CONFIG.epochs
    for a, b in zip(full, weights(model3)):
        assert torch.equal(a, b)


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    model, batches, objective = toy_problem()
    pretrain(model, [{"params": list(model.parameters())}], objective, batches, N // CONFIG.batch_size, CONFIG,
             work_dir=tmp_path, device=torch.device("cpu"), resume=False)
    other = PretrainConfig(epochs=5, batch_size=16, lr=0.3, weight_decay=0.0, warmup_steps=2, seed=3)
    with pytest.raises(CheckpointError, match="other settings"):
        pretrain(model, [{"params": list(model.parameters())}], objective, batches, N // CONFIG.batch_size, other,
                 work_dir=tmp_path, device=torch.device("cpu"), resume=True)


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / CHECKPOINT_NAME
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=str(bad)):
        read_checkpoint(bad)
