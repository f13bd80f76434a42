"""One training loop with three ways of computing the update.

Modes:
    torch          autograd gradients and ``torch.optim.SGD``
    manual_update  autograd gradients and the manual ``cifar2.optimizer.SGD``
    manual         manual backpropagation and the manual SGD; no autograd at all

All three see the same batches in the same order, so from identical initial weights they must
follow the same trajectory up to rounding.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cifar2 import backprop
from cifar2.losses import CrossEntropy
from cifar2.network import MLP, experiment_mlp
from cifar2.optimizer import SGD

logger = logging.getLogger(__name__)

MODES = ("torch", "manual_update", "manual")


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False


@dataclass
class TrainResult:
    """What a run produced: per-epoch history, whether it diverged, and the final scores.

    ``history`` has one row per finished epoch with ``train_loss`` (mean over all training samples,
    each batch weighted by its size), ``train_accuracy`` (of the predictions made during the epoch,
    while the weights were changing), ``val_loss`` and ``val_accuracy`` (after the epoch).
    ``final_train_accuracy`` is measured on the whole training split after the last epoch.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    diverged: bool = False
    diverged_epoch: int | None = None
    final_train_loss: float = math.nan
    final_train_accuracy: float = math.nan
    final_val_loss: float = math.nan
    final_val_accuracy: float = math.nan
    train_seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        summary = asdict(self)
        summary.pop("history")
        return summary


def build_model(hidden_sizes: Sequence[int], activation: str, n_classes: int, seed: int,
                dtype: torch.dtype, device: torch.device | str = "cpu") -> MLP:
    """Seed the global generator right before creating the model, so its weights are repeatable."""
    torch.manual_seed(seed)
    return experiment_mlp(hidden_sizes, activation, n_classes, dtype=dtype, device=device)


def make_optimizer(model: MLP, mode: str, config: OptimizerConfig):
    arguments = dict(lr=config.lr, momentum=config.momentum, dampening=config.dampening,
                     weight_decay=config.weight_decay, nesterov=config.nesterov)
    if mode == "torch":
        return torch.optim.SGD(model.parameters(), **arguments)
    if mode in ("manual_update", "manual"):
        return SGD(model.parameters(), **arguments)
    raise ValueError(f"Unknown training mode {mode!r}; choose one of {', '.join(MODES)}.")


@torch.no_grad()
def evaluate(model: MLP, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> tuple[float, float, torch.Tensor]:
    """Return the mean cross-entropy, the accuracy and the predicted labels on ``(x, y)``."""
    total_loss, predictions = 0.0, []
    for start in range(0, len(y), batch_size):
        output = model(x[start:start + batch_size])
        total_loss += F.cross_entropy(output, y[start:start + batch_size], reduction="sum").item()
        predictions.append(output.argmax(dim=1))
    predicted = torch.cat(predictions)
    return total_loss / len(y), (predicted == y).double().mean().item(), predicted


def _step(model: MLP, optimizer, mode: str, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """One update on one batch; return the batch's mean loss and its number of correct predictions."""
    if mode == "manual":
        with torch.no_grad():
            output = model(x)
            loss = F.cross_entropy(output, y)
            backprop.backward(model, _CROSS_ENTROPY.gradient(output, y))
    else:
        optimizer.zero_grad()
        output = model(x)
        loss = F.cross_entropy(output, y)
        loss.backward()
    optimizer.step()
    correct = int((output.detach().argmax(dim=1) == y).sum())
    return loss.item(), correct


_CROSS_ENTROPY = CrossEntropy()


def train(model: MLP, mode: str, config: OptimizerConfig, train_x: torch.Tensor, train_y: torch.Tensor,
          val_x: torch.Tensor, val_y: torch.Tensor, epochs: int, batch_size: int,
          shuffle: bool = False, seed: int = 0, description: str = "train",
          parameter_log: list[list[torch.Tensor]] | None = None) -> TrainResult:
    """Train ``model`` in place for ``epochs`` epochs and return its history and final scores.

    A non-finite batch loss (NaN or infinity) stops the run and marks it diverged instead of
    raising. With ``shuffle`` the batch order of each epoch comes from a generator seeded with
    ``seed``; without it every epoch visits the samples in stored order. If ``parameter_log`` is
    a list, a copy of every parameter is appended to it after each epoch.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown training mode {mode!r}; choose one of {', '.join(MODES)}.")
    optimizer = make_optimizer(model, mode, config)
    n_samples = len(train_y)
    generator = torch.Generator().manual_seed(seed)
    result = TrainResult()

    progress = tqdm(range(1, epochs + 1), desc=description, unit="epoch", leave=False)
    started = time.perf_counter()
    for epoch in progress:
        order = torch.randperm(n_samples, generator=generator) if shuffle else None
        loss_sum, correct = 0.0, 0
        for start in range(0, n_samples, batch_size):
            if order is None:
                x, y = train_x[start:start + batch_size], train_y[start:start + batch_size]
            else:
                index = order[start:start + batch_size].to(train_x.device)
                x, y = train_x[index], train_y[index]
            batch_loss, batch_correct = _step(model, optimizer, mode, x, y)
            if not math.isfinite(batch_loss):
                result.diverged, result.diverged_epoch = True, epoch
                break
            loss_sum += batch_loss * len(y)
            correct += batch_correct
        if result.diverged:
            logger.warning("%s diverged in epoch %d: the training loss became %s.", description,
                           epoch, batch_loss)
            break

        val_loss, val_accuracy, _ = evaluate(model, val_x, val_y)
        result.history.append({
            "epoch": epoch,
            "train_loss": loss_sum / n_samples,
            "train_accuracy": correct / n_samples,
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
        })
        if parameter_log is not None:
            parameter_log.append([p.detach().clone() for p in model.parameters()])
        progress.set_postfix(loss=f"{loss_sum / n_samples:.4f}", val_acc=f"{val_accuracy:.4f}")
    result.train_seconds = time.perf_counter() - started

    if result.history:
        result.final_train_loss = result.history[-1]["train_loss"]
        result.final_val_loss = result.history[-1]["val_loss"]
        result.final_val_accuracy = result.history[-1]["val_accuracy"]
    if not result.diverged:
        result.final_train_accuracy = evaluate(model, train_x, train_y)[1]
    logger.info("%s: %d epochs in %.1f s, train loss %.4f, train accuracy %.4f, validation "
                "accuracy %.4f%s.", description, len(result.history), result.train_seconds,
                result.final_train_loss, result.final_train_accuracy, result.final_val_accuracy,
                ", diverged" if result.diverged else "")
    return result
