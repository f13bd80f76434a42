"""The manual SGD (``cifar2.optimizer.SGD``) against ``torch.optim.SGD``, step by step."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F

from cifar2.network import MLP
from cifar2.optimizer import SGD

LR = 0.01
STEPS = 5
# (weight_decay, momentum) of every configuration in params.yaml's sweep.
SWEEP = [(0.0, 0.0), (0.01, 0.0), (0.9, 0.0), (0.0, 0.01), (0.0, 0.9), (0.01, 0.9), (0.9, 0.01),
         (0.001, 0.9), (0.01, 0.8)]
CONFIGS = [dict(lr=LR, weight_decay=weight_decay, momentum=momentum) for weight_decay, momentum in SWEEP] + [
    dict(lr=LR, momentum=0.9, dampening=0.3),
    dict(lr=LR, momentum=0.9, dampening=0.3, weight_decay=0.01),
    dict(lr=LR, momentum=0.9, nesterov=True),
    dict(lr=LR, momentum=0.9, nesterov=True, weight_decay=0.01),
    dict(lr=LR, maximize=True),
    dict(lr=LR, maximize=True, momentum=0.9),
    dict(lr=LR, maximize=True, weight_decay=0.01),
    dict(lr=LR, maximize=True, momentum=0.9, weight_decay=0.01, dampening=0.3),
    dict(lr=LR, maximize=True, momentum=0.9, weight_decay=0.01, nesterov=True),
]


def config_id(config: dict) -> str:
    return ",".join(f"{key}={value}" for key, value in config.items() if key != "lr")


def small_model() -> MLP:
    torch.manual_seed(0)
    return MLP([6, 5, 4, 3], ["tanh", "relu", "identity"])


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=generator)
    return x, y


def take_step(model: MLP, optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """Compute fresh autograd gradients on ``(x, y)`` and let ``optimizer`` take one step."""
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_sgd_matches_torch_exactly(config):
    manual_model = small_model()
    torch_model = copy.deepcopy(manual_model)
    initial = [p.detach().clone() for p in manual_model.parameters()]
    manual_optimizer = SGD(manual_model.parameters(), **config)
    torch_optimizer = torch.optim.SGD(torch_model.parameters(), **config)
    x, y = fixed_batch()

    for step in range(1, STEPS + 1):
        take_step(manual_model, manual_optimizer, x, y)
        take_step(torch_model, torch_optimizer, x, y)
        for (name, manual), torch_parameter in zip(manual_model.named_parameters(), torch_model.parameters()):
            assert torch.equal(manual, torch_parameter), f"step {step}, {name}"

    for (name, parameter), start in zip(manual_model.named_parameters(), initial):
        assert not torch.equal(parameter, start), f"{name} never moved"


@pytest.mark.parametrize("config", [
    dict(lr=LR, momentum=0.9),
    dict(lr=LR, momentum=0.9, weight_decay=0.01),
    dict(lr=LR, maximize=True, momentum=0.9, weight_decay=0.01, nesterov=True),
], ids=config_id)
def test_sgd_step_leaves_used_gradient(config):
    model = small_model()
    optimizer = SGD(model.parameters(), **config)
    x, y = fixed_batch()

    for step in range(1, 3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        gradients = [p.grad.clone() for p in model.parameters()]
        weights = [p.detach().clone() for p in model.parameters()]
        optimizer.step()
        for (name, parameter), gradient, weight in zip(model.named_parameters(), gradients, weights):
            used = -gradient if config.get("maximize") else gradient
            used = used.add(weight, alpha=config.get("weight_decay", 0.0))
            assert torch.equal(parameter.grad, used), f"step {step}, {name}"


@pytest.mark.parametrize(("arguments", "bad_value"), [
    (dict(lr=-0.1), "-0.1"),
    (dict(lr=LR, momentum=-0.5), "-0.5"),
    (dict(lr=LR, weight_decay=-0.01), "-0.01"),
    (dict(lr=LR, momentum=0.0, nesterov=True), "momentum=0.0"),
    (dict(lr=LR, momentum=0.9, dampening=0.3, nesterov=True), "dampening=0.3"),
], ids=["negative_lr", "negative_momentum", "negative_weight_decay", "nesterov_without_momentum",
        "nesterov_with_dampening"])
def test_sgd_invalid_arguments_raise(arguments, bad_value):
    model = small_model()

    with pytest.raises(ValueError, match=re.escape(bad_value)):
        SGD(model.parameters(), **arguments)


def test_sgd_empty_parameters_raise():
    with pytest.raises(ValueError):
        SGD([], lr=LR)


def test_sgd_skips_parameters_without_grad():
    first = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    second = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    optimizer = SGD([first, second], lr=0.1, momentum=0.9, weight_decay=0.01)
    first.grad = torch.tensor([0.5, 0.5], dtype=torch.float64)

    optimizer.step()

    assert torch.equal(second.detach(), torch.tensor([3.0, 4.0], dtype=torch.float64))
    assert second.grad is None
    assert not torch.equal(first.detach(), torch.tensor([1.0, -2.0], dtype=torch.float64))


def test_sgd_late_gradient_matches_torch():
    """A parameter that gets its first gradient at step 2 starts its momentum then, as in torch."""
    manual_model = small_model()
    torch_model = copy.deepcopy(manual_model)
    config = dict(lr=LR, momentum=0.9, weight_decay=0.01, dampening=0.3)
    manual_optimizer = SGD(manual_model.parameters(), **config)
    torch_optimizer = torch.optim.SGD(torch_model.parameters(), **config)
    x, y = fixed_batch()

    for step in range(1, 4):
        for model, optimizer in [(manual_model, manual_optimizer), (torch_model, torch_optimizer)]:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if step == 1:
                model.linear(1).weight.grad = None
            optimizer.step()
        for (name, manual), torch_parameter in zip(manual_model.named_parameters(), torch_model.parameters()):
            assert torch.equal(manual, torch_parameter), f"step {step}, {name}"


def test_sgd_zero_grad_sets_none():
    model = small_model()
    optimizer = SGD(model.parameters(), lr=LR, momentum=0.9)
    x, y = fixed_batch()
    F.cross_entropy(model(x), y).backward()
    assert all(parameter.grad is not None for parameter in model.parameters())

    optimizer.zero_grad()

    for name, parameter in model.named_parameters():
        assert parameter.grad is None, name
