"""Gradient checking: manual backpropagation against autograd and against finite differences.

The relative error between a reference gradient ``g_ref`` and a gradient ``g`` is

    ||g_ref - g|| / (||g_ref|| + ||g||)      (0 when both are zero)

which stays meaningful for gradients of any scale. Finite differences use the central formula

    dL/dtheta ~ (L(theta + h) - L(theta - h)) / (2 h)

whose truncation error is O(h**2), against O(h) for the one-sided formula; in float64 a step near
1e-6 balances it against rounding error, which grows like machine epsilon * |L| / h.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from cifar2.backprop import backward
from cifar2.network import MLP

logger = logging.getLogger(__name__)

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BackwardFn = Callable[..., None]


def relative_error(reference: torch.Tensor, value: torch.Tensor) -> float:
    denominator = (reference.norm() + value.norm()).item()
    if denominator == 0.0:
        return 0.0
    return (reference - value).norm().item() / denominator


def largest(values: Iterable[float]) -> float:
    """Return the maximum of ``values``, or NaN if any of them is NaN (Python's ``max`` may skip NaN)."""
    values = list(values)
    return math.nan if any(math.isnan(value) for value in values) else max(values)


def manual_gradients(model: MLP, loss, x: torch.Tensor, y: torch.Tensor,
                     backward_fn: BackwardFn = backward) -> dict[str, torch.Tensor]:
    """Gradients of ``loss(model(x), y)`` from the manual backward pass, keyed by parameter name."""
    with torch.no_grad():
        output = model(x)
        backward_fn(model, loss.gradient(output, y), store_grad=False)
    gradients = {}
    for l in range(1, model.L + 1):
        gradients[f"layers.{l - 1}.weight"] = model.dL_dw[l].clone()
        gradients[f"layers.{l - 1}.bias"] = model.dL_db[l].clone()
    return gradients


def autograd_gradients(model: MLP, loss: Loss, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of ``loss(model(x), y)`` from ``torch.autograd``, keyed by parameter name."""
    parameters = dict(model.named_parameters())
    with torch.enable_grad():
        value = loss(model(x), y)
        gradients = torch.autograd.grad(value, list(parameters.values()))
    return dict(zip(parameters, gradients))


def _relu_pattern(model: MLP) -> torch.Tensor:
    """Which pre-activations of ReLU layers are positive after the last forward pass."""
    masks = [model.z[l] > 0 for l in model.z if model.f[l].name == "relu"]
    return torch.cat([mask.flatten() for mask in masks]) if masks else torch.zeros(0, dtype=torch.bool)


@dataclass
class FiniteDifferenceResult:
    """Central-difference estimates of some entries of one parameter."""

    entries: torch.Tensor  # flat indices into the parameter
    estimates: torch.Tensor  # (len(entries),)
    skipped_at_kink: int = 0


@torch.no_grad()
def finite_differences(model: MLP, loss: Loss, x: torch.Tensor, y: torch.Tensor, name: str,
                       step: float, max_entries: int, generator: torch.Generator) -> FiniteDifferenceResult:
    """Estimate ``dL/dtheta`` for up to ``max_entries`` entries of parameter ``name``.

    Parameters with more entries are sampled at random (from ``generator``). An entry for which
    ``theta + h`` or ``theta - h`` switches any ReLU on or off is skipped and replaced by the next
    sampled entry: the loss has a kink between the two points, so the difference quotient does
    not estimate the derivative there, and counting it would raise a false alarm.
    """
    parameter = dict(model.named_parameters())[name]
    flat = parameter.view(-1)
    order = torch.randperm(flat.numel(), generator=generator)

    model(x)
    base_pattern = _relu_pattern(model)
    entries, estimates, skipped = [], [], 0
    for index in order.tolist():
        if len(entries) == max_entries:
            break
        original = flat[index].item()
        flat[index] = original + step
        loss_plus = loss(model(x), y).item()
        pattern_plus = _relu_pattern(model)
        flat[index] = original - step
        loss_minus = loss(model(x), y).item()
        pattern_minus = _relu_pattern(model)
        flat[index] = original

        if not (torch.equal(pattern_plus, base_pattern) and torch.equal(pattern_minus, base_pattern)):
            skipped += 1
            continue
        entries.append(index)
        estimates.append((loss_plus - loss_minus) / (2 * step))

    return FiniteDifferenceResult(
        entries=torch.tensor(entries, dtype=torch.int64),
        estimates=torch.tensor(estimates, dtype=parameter.dtype),
        skipped_at_kink=skipped,
    )


@dataclass
class LayerCheck:
    """Largest relative errors of one layer (over its weight and bias) against each reference."""

    layer: int
    error_autograd: float
    error_finite_diff: float
    entries_checked: int
    skipped_at_kink: int


@dataclass
class CaseCheck:
    name: str
    description: str
    layers: list[LayerCheck] = field(default_factory=list)

    @property
    def max_error_autograd(self) -> float:
        return max(layer.error_autograd for layer in self.layers)

    @property
    def max_error_finite_diff(self) -> float:
        return max(layer.error_finite_diff for layer in self.layers)


def check_gradients(model: MLP, loss, x: torch.Tensor, y: torch.Tensor, step: float,
                    max_entries: int, seed: int, name: str = "case", description: str = "",
                    backward_fn: BackwardFn = backward) -> CaseCheck:
    """Compare manual gradients with autograd (every entry) and with finite differences (sampled).

    ``backward_fn`` is the manual backward pass under test; tests pass a broken one to show that
    the check can fail.
    """
    manual = manual_gradients(model, loss, x, y, backward_fn)
    reference = autograd_gradients(model, loss, x, y)
    generator = torch.Generator().manual_seed(seed)

    case = CaseCheck(name=name, description=description)
    for l in range(1, model.L + 1):
        errors_autograd, errors_fd, checked, skipped = [], [], 0, 0
        for kind in ("weight", "bias"):
            key = f"layers.{l - 1}.{kind}"
            errors_autograd.append(relative_error(reference[key], manual[key]))
            estimate = finite_differences(model, loss, x, y, key, step, max_entries, generator)
            sampled_manual = manual[key].reshape(-1)[estimate.entries]
            errors_fd.append(relative_error(estimate.estimates, sampled_manual))
            checked += estimate.entries.numel()
            skipped += estimate.skipped_at_kink
        case.layers.append(LayerCheck(layer=l, error_autograd=max(errors_autograd),
                                      error_finite_diff=max(errors_fd), entries_checked=checked,
                                      skipped_at_kink=skipped))
        logger.info("%s layer %d: relative error %.2e vs autograd, %.2e vs finite differences "
                    "(%d entries, %d skipped at ReLU kinks).", name, l, max(errors_autograd),
                    max(errors_fd), checked, skipped)
    return case


class StepGradientCheck:
    """Manual backpropagation checked against autograd at every step of a training run.

    Pass an instance as ``Trainer(..., before_update=check)`` to a run in mode ``torch`` or
    ``manual_update``. At each step, after autograd has filled ``.grad`` and before the optimizer
    moves the weights, it runs ``backward_fn`` on the same forward pass and keeps the largest
    relative error over all parameters and steps. Both gradients come from the same weights at
    every step, so the check does not drift as the weights of two separate runs would.
    """

    def __init__(self, model: MLP, loss, backward_fn: BackwardFn = backward):
        self.model, self.loss, self.backward_fn = model, loss, backward_fn
        self.max_error = 0.0
        self.steps = 0
        self.seconds = 0.0  # time spent in the check, which a Trainer counts as training time

    def __call__(self, output: torch.Tensor, y: torch.Tensor) -> None:
        started = time.perf_counter()
        # An output without a graph means the step ran in mode manual, where .grad is the manual
        # gradient itself and the check would compare it with itself.
        if not output.requires_grad:
            raise ValueError("StepGradientCheck needs autograd gradients in .grad, but the output has "
                             "no autograd graph; use it in mode torch or manual_update.")
        self.backward_fn(self.model, self.loss.gradient(output.detach(), y), store_grad=False)
        for l in range(1, self.model.L + 1):
            layer = self.model.linear(l)
            for autograd_gradient, manual_gradient in ((layer.weight.grad, self.model.dL_dw[l]),
                                                       (layer.bias.grad, self.model.dL_db[l])):
                # A NaN error stays the maximum, so a non-finite gradient fails the check.
                self.max_error = largest([self.max_error, relative_error(autograd_gradient, manual_gradient)])
        self.steps += 1
        self.seconds += time.perf_counter() - started
