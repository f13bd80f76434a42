"""One training loop with three ways of computing the update.

Modes:
    torch          autograd gradients and ``torch.optim.SGD``
    manual_update  autograd gradients and the manual ``cifar2.optimizer.SGD``
    manual         manual backpropagation and the manual SGD; no autograd at all

All three see the same batches in the same order, so from identical initial weights they follow
the same trajectory up to rounding. ``torch`` and ``manual_update`` round alike and stay equal to
the last bit. ``manual`` rounds the loss gradient differently in the last bit, and long runs
amplify that: once a difference is large enough to switch a ReLU unit on a different side, the
two runs separate. Over 50 epochs of the compare stage's configuration this happened in epoch 35
on one CPU (MKL on an Intel Xeon) and not at all on another (an AMD EPYC).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cifar2 import backprop
from cifar2.losses import CrossEntropy
from cifar2.network import MLP, experiment_mlp
from cifar2.optimizer import SGD

logger = logging.getLogger(__name__)

MODES = ("torch", "manual_update", "manual")

# Called as before_update(output, y) with the batch's network output and labels.
BeforeUpdate = Callable[[torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False


@dataclass
class TrainResult:
    """Outcome of a run: per-epoch history, whether it diverged, and the final scores.

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


def _step(model: MLP, optimizer, mode: str, x: torch.Tensor, y: torch.Tensor,
          before_update: BeforeUpdate | None = None) -> tuple[float, int]:
    """Run one update on one batch; return the batch's mean loss and its number of correct predictions."""
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
    if before_update is not None:
        before_update(output, y)
    optimizer.step()
    correct = int((output.detach().argmax(dim=1) == y).sum())
    return loss.item(), correct


_CROSS_ENTROPY = CrossEntropy()


class Trainer:
    """Trains one model epoch by epoch, so several runs can advance in lockstep.

    ``run_epoch`` returns the epoch's history row, or None once the run has diverged: a
    non-finite batch loss, weight or validation loss (NaN or infinity) stops it without raising. With ``shuffle`` the batch
    order of each epoch comes from a generator seeded with ``seed``; without it every epoch
    visits the samples in stored order. ``before_update(output, y)``, if given, runs at every
    step after the gradients are computed and before the optimizer changes the weights.
    """

    def __init__(self, model: MLP, mode: str, config: OptimizerConfig, train_x: torch.Tensor,
                 train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, batch_size: int,
                 shuffle: bool = False, seed: int = 0, description: str = "train",
                 before_update: BeforeUpdate | None = None):
        if mode not in MODES:
            raise ValueError(f"Unknown training mode {mode!r}; choose one of {', '.join(MODES)}.")
        self.model, self.mode, self.description = model, mode, description
        self.optimizer = make_optimizer(model, mode, config)
        self.train_x, self.train_y, self.val_x, self.val_y = train_x, train_y, val_x, val_y
        self.batch_size, self.shuffle = batch_size, shuffle
        self.before_update = before_update
        self.generator = torch.Generator().manual_seed(seed)
        self.result = TrainResult()

    def run_epoch(self) -> dict[str, Any] | None:
        if self.result.diverged:
            return None
        started = time.perf_counter()
        epoch = len(self.result.history) + 1
        n_samples = len(self.train_y)
        order = torch.randperm(n_samples, generator=self.generator) if self.shuffle else None

        loss_sum, correct = 0.0, 0
        for start in range(0, n_samples, self.batch_size):
            if order is None:
                x = self.train_x[start:start + self.batch_size]
                y = self.train_y[start:start + self.batch_size]
            else:
                index = order[start:start + self.batch_size].to(self.train_x.device)
                x, y = self.train_x[index], self.train_y[index]
            batch_loss, batch_correct = _step(self.model, self.optimizer, self.mode, x, y,
                                              self.before_update)
            if not math.isfinite(batch_loss):
                return self._diverge(epoch, started, f"the training loss became {batch_loss}")
            loss_sum += batch_loss * len(y)
            correct += batch_correct

        # The last step of the epoch can overflow the weights after its loss was recorded.
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            return self._diverge(epoch, started, "a weight became NaN or infinite")
        val_loss, val_accuracy, _ = evaluate(self.model, self.val_x, self.val_y)
        if not math.isfinite(val_loss):
            return self._diverge(epoch, started, f"the validation loss became {val_loss}")
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / n_samples,
            "train_accuracy": correct / n_samples,
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
        }
        self.result.history.append(row)
        self.result.train_seconds += time.perf_counter() - started
        return row

    def _diverge(self, epoch: int, started: float, reason: str) -> None:
        self.result.diverged, self.result.diverged_epoch = True, epoch
        self.result.train_seconds += time.perf_counter() - started
        logger.warning("%s diverged in epoch %d: %s.", self.description, epoch, reason)
        return None

    def finish(self) -> TrainResult:
        """Fill in the final scores; the training accuracy comes from one pass over the whole split."""
        result = self.result
        if result.history:
            result.final_train_loss = result.history[-1]["train_loss"]
            result.final_val_loss = result.history[-1]["val_loss"]
            result.final_val_accuracy = result.history[-1]["val_accuracy"]
        if not result.diverged:
            result.final_train_accuracy = evaluate(self.model, self.train_x, self.train_y)[1]
        logger.info("%s: %d epochs in %.1f s, train loss %.4f, train accuracy %.4f, validation "
                    "accuracy %.4f%s.", self.description, len(result.history), result.train_seconds,
                    result.final_train_loss, result.final_train_accuracy, result.final_val_accuracy,
                    ", diverged" if result.diverged else "")
        return result


def train(model: MLP, mode: str, config: OptimizerConfig, train_x: torch.Tensor, train_y: torch.Tensor,
          val_x: torch.Tensor, val_y: torch.Tensor, epochs: int, batch_size: int,
          shuffle: bool = False, seed: int = 0, description: str = "train") -> TrainResult:
    """Train ``model`` in place for up to ``epochs`` epochs and return its history and final scores."""
    trainer = Trainer(model, mode, config, train_x, train_y, val_x, val_y, batch_size, shuffle,
                      seed, description)
    progress = tqdm(range(epochs), desc=description, unit="epoch", leave=False)
    for _ in progress:
        row = trainer.run_epoch()
        if row is None:
            break
        progress.set_postfix(loss=f"{row['train_loss']:.4f}", val_acc=f"{row['val_accuracy']:.4f}")
    return trainer.finish()
