"""Manual backpropagation (``cifar2.backprop.backward``) against autograd on the same network."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from cifar2.backprop import backward
from cifar2.losses import CrossEntropy, SumSquaredError
from cifar2.network import ACTIVATIONS, MLP, experiment_mlp

TOLERANCE_FLOAT64 = 1e-12
TOLERANCE_FLOAT32 = 1e-5
ARCHITECTURE_SEEDS = range(24)
BATCH_SIZES = (1, 7, 16)
LOSSES = {"sse": SumSquaredError(), "cross_entropy": CrossEntropy()}


def relative_difference(reference: torch.Tensor, value: torch.Tensor) -> float:
    """Return ``||reference - value|| / (||reference|| + ||value||)``, or 0 when both are zero."""
    denominator = (reference.norm() + value.norm()).item()
    if denominator == 0.0:
        return 0.0
    return (reference - value).norm().item() / denominator


def random_architecture(seed: int) -> tuple[list[int], list[str]]:
    """Draw 1 to 5 layers, input and hidden widths 1 to 9, 2 to 5 outputs and an activation per layer."""
    rng = random.Random(seed)
    depth = rng.randint(1, 5)
    sizes = [rng.randint(1, 9) for _ in range(depth)] + [rng.randint(2, 5)]
    activations = [rng.choice(sorted(ACTIVATIONS)) for _ in range(depth)]
    return sizes, activations


def make_batch(model: MLP, loss_name: str, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return inputs and targets: real targets ``(B, K)`` for SSE, class ids ``(B,)`` for cross-entropy."""
    generator = torch.Generator().manual_seed(seed)
    dtype = model.linear(1).weight.dtype
    n_outputs = model.sizes[-1]
    x = torch.randn(batch_size, model.sizes[0], generator=generator, dtype=dtype)
    if loss_name == "sse":
        y = torch.randn(batch_size, n_outputs, generator=generator, dtype=dtype)
    else:
        y = torch.randint(0, n_outputs, (batch_size,), generator=generator)
    return x, y


def autograd_reference(model: MLP, loss, x: torch.Tensor, y: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Return autograd's ``(dL/dW[l], dL/db[l])`` for every layer ``l``."""
    parameters = [p for l in range(1, model.L + 1) for p in (model.linear(l).weight, model.linear(l).bias)]
    with torch.enable_grad():
        value = loss(model(x), y)
        gradients = torch.autograd.grad(value, parameters)
    return {l: (gradients[2 * (l - 1)], gradients[2 * (l - 1) + 1]) for l in range(1, model.L + 1)}


def run_manual_backward(model: MLP, loss, x: torch.Tensor, y: torch.Tensor, **options) -> None:
    with torch.no_grad():
        output = model(x)
        backward(model, loss.gradient(output, y), **options)


def seeded_model(sizes: list[int], activations: list[str], seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(sizes, activations)


def test_random_architectures_cover_depths_and_activations():
    architectures = [random_architecture(seed) for seed in ARCHITECTURE_SEEDS]
    depths = {len(activations) for _, activations in architectures}
    used_activations = {name for _, activations in architectures for name in activations}
    hidden_activations = {name for _, activations in architectures for name in activations[:-1]}

    assert depths == {1, 2, 3, 4, 5}
    assert used_activations == set(ACTIVATIONS)
    assert hidden_activations == set(ACTIVATIONS)


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("seed", ARCHITECTURE_SEEDS)
def test_backward_matches_autograd_random_architectures(seed, loss_name, batch_size):
    sizes, activations = random_architecture(seed)
    model = seeded_model(sizes, activations, seed)
    loss = LOSSES[loss_name]
    x, y = make_batch(model, loss_name, batch_size, seed)

    reference = autograd_reference(model, loss, x, y)
    run_manual_backward(model, loss, x, y, store_grad=False)

    for l in range(1, model.L + 1):
        weight_reference, bias_reference = reference[l]
        assert relative_difference(weight_reference, model.dL_dw[l]) <= TOLERANCE_FLOAT64, f"dL_dw[{l}]"
        assert relative_difference(bias_reference, model.dL_db[l]) <= TOLERANCE_FLOAT64, f"dL_db[{l}]"


@pytest.mark.parametrize("seed", ARCHITECTURE_SEEDS)
def test_gradient_shapes_match_parameters(seed):
    sizes, activations = random_architecture(seed)
    model = seeded_model(sizes, activations, seed)
    x, y = make_batch(model, "cross_entropy", 7, seed)

    run_manual_backward(model, CrossEntropy(), x, y)

    for l in range(1, model.L + 1):
        assert model.dL_dw[l].shape == model.linear(l).weight.shape, f"dL_dw[{l}]"
        assert model.dL_db[l].shape == model.linear(l).bias.shape, f"dL_db[{l}]"


def test_backward_matches_autograd_experiment_network():
    torch.manual_seed(1)
    model = experiment_mlp([512, 128, 32], "relu", 2)
    x, y = make_batch(model, "cross_entropy", 3, seed=1)

    reference = autograd_reference(model, CrossEntropy(), x, y)
    run_manual_backward(model, CrossEntropy(), x, y, store_grad=False)

    for l in range(1, model.L + 1):
        weight_reference, bias_reference = reference[l]
        assert relative_difference(weight_reference, model.dL_dw[l]) <= TOLERANCE_FLOAT64, f"dL_dw[{l}]"
        assert relative_difference(bias_reference, model.dL_db[l]) <= TOLERANCE_FLOAT64, f"dL_db[{l}]"


def test_relu_derivative_at_zero_matches_autograd():
    # A zero input row and zero biases give z[1] == 0 exactly for sample 0, where autograd takes
    # ReLU's derivative as 0.
    model = seeded_model([3, 4, 2], ["relu", "identity"], seed=9)
    with torch.no_grad():
        model.linear(1).bias.zero_()
    x, y = make_batch(model, "cross_entropy", 5, seed=9)
    x[0] = 0.0

    reference = autograd_reference(model, CrossEntropy(), x, y)
    run_manual_backward(model, CrossEntropy(), x, y)

    assert torch.equal(model.z[1][0], torch.zeros(4, dtype=torch.float64))
    assert relative_difference(reference[1][1], model.dL_db[1]) <= TOLERANCE_FLOAT64
    assert relative_difference(reference[1][0], model.dL_dw[1]) <= TOLERANCE_FLOAT64


def test_backward_records_no_autograd_graph():
    model = seeded_model([5, 4, 3, 2], ["tanh", "sigmoid", "identity"])
    x, y = make_batch(model, "cross_entropy", 6, seed=2)

    # Forward pass and loss gradient with autograd on, so every input of backward carries a graph.
    output = model(x)
    dL_dout = CrossEntropy().gradient(output, y)
    assert dL_dout.requires_grad
    backward(model, dL_dout, store_grad=True)

    for l in range(1, model.L + 1):
        layer = model.linear(l)
        for name, tensor in [(f"dL_dw[{l}]", model.dL_dw[l]), (f"dL_db[{l}]", model.dL_db[l]),
                             (f"layer {l} weight.grad", layer.weight.grad),
                             (f"layer {l} bias.grad", layer.bias.grad)]:
            assert not tensor.requires_grad, name
            assert tensor.grad_fn is None, name


def test_store_grad_false_keeps_missing_grad():
    model = seeded_model([4, 3, 2], ["relu", "identity"])
    x, y = make_batch(model, "sse", 5, seed=3)

    run_manual_backward(model, SumSquaredError(), x, y, store_grad=False)

    for name, parameter in model.named_parameters():
        assert parameter.grad is None, name


def test_store_grad_false_keeps_existing_grad():
    model = seeded_model([4, 3, 2], ["relu", "identity"])
    x, y = make_batch(model, "sse", 5, seed=3)
    sentinels = {}
    for name, parameter in model.named_parameters():
        parameter.grad = torch.full_like(parameter, 7.0)
        sentinels[name] = parameter.grad

    run_manual_backward(model, SumSquaredError(), x, y, store_grad=False)

    for name, parameter in model.named_parameters():
        assert parameter.grad is sentinels[name], name
        assert torch.equal(parameter.grad, torch.full_like(parameter, 7.0)), name


def test_store_grad_writes_gradients():
    model = seeded_model([6, 5, 4, 3], ["sigmoid", "relu", "identity"])
    x, y = make_batch(model, "cross_entropy", 7, seed=4)

    run_manual_backward(model, CrossEntropy(), x, y, store_grad=True)

    for l in range(1, model.L + 1):
        layer = model.linear(l)
        assert layer.weight.grad is model.dL_dw[l], f"layer {l} weight: .grad is a copy"
        assert layer.bias.grad is model.dL_db[l], f"layer {l} bias: .grad is a copy"


def test_store_grad_false_keeps_shared_grad():
    model = seeded_model([6, 5, 4, 3], ["relu", "relu", "identity"])
    x, y = make_batch(model, "cross_entropy", 7, seed=4)
    run_manual_backward(model, CrossEntropy(), x, y, store_grad=True)
    stored = {name: (parameter.grad, parameter.grad.clone()) for name, parameter in model.named_parameters()}

    x_other, y_other = make_batch(model, "cross_entropy", 7, seed=5)
    run_manual_backward(model, CrossEntropy(), x_other, y_other, store_grad=False)

    for name, parameter in model.named_parameters():
        tensor, values = stored[name]
        assert parameter.grad is tensor, name
        assert torch.equal(parameter.grad, values), f"{name} was overwritten"
    reference = autograd_reference(model, CrossEntropy(), x_other, y_other)
    for l in range(1, model.L + 1):
        assert relative_difference(reference[l][0], model.dL_dw[l]) <= TOLERANCE_FLOAT64, f"dL_dw[{l}]"


def test_backward_correct_after_optimizer_step():
    model = seeded_model([6, 5, 4, 3], ["tanh", "relu", "identity"])
    loss = CrossEntropy()
    x, y = make_batch(model, "cross_entropy", 9, seed=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01)

    for round_number in (1, 2):
        weights_before = [p.detach().clone() for p in model.parameters()]
        reference = autograd_reference(model, loss, x, y)
        run_manual_backward(model, loss, x, y, store_grad=True)

        for l in range(1, model.L + 1):
            layer = model.linear(l)
            weight_reference, bias_reference = reference[l]
            where = f"round {round_number}, layer {l}"
            assert relative_difference(weight_reference, model.dL_dw[l]) <= TOLERANCE_FLOAT64, where
            assert relative_difference(bias_reference, model.dL_db[l]) <= TOLERANCE_FLOAT64, where
            assert torch.equal(layer.weight.grad, model.dL_dw[l]), where
            assert torch.equal(layer.bias.grad, model.dL_db[l]), where

        optimizer.step()
        for before, after in zip(weights_before, model.parameters()):
            assert not torch.equal(before, after), f"round {round_number}: the step changed nothing"


def test_debug_logs_shapes_per_layer(caplog):
    sizes = [6, 5, 4, 3]
    model = seeded_model(sizes, ["tanh", "relu", "identity"])
    batch_size = 7
    x, y = make_batch(model, "cross_entropy", batch_size, seed=6)

    with caplog.at_level(logging.INFO, logger="cifar2.backprop"):
        run_manual_backward(model, CrossEntropy(), x, y, debug=True)

    messages = [record.getMessage() for record in caplog.records if record.name == "cifar2.backprop"]
    assert len(messages) == model.L
    for l in range(1, model.L + 1):
        layer_messages = [message for message in messages if message.startswith(f"layer {l}:")]
        assert len(layer_messages) == 1, f"layer {l}"
        message = layer_messages[0]
        assert str((batch_size, sizes[l])) in message, f"layer {l}: delta shape"
        assert str((batch_size, sizes[l - 1])) in message, f"layer {l}: a[l-1] shape"
        assert str((sizes[l], sizes[l - 1])) in message, f"layer {l}: dL_dw shape"
        assert str((sizes[l],)) in message, f"layer {l}: dL_db shape"


def test_debug_off_logs_nothing(caplog):
    model = seeded_model([6, 5, 3], ["tanh", "identity"])
    x, y = make_batch(model, "cross_entropy", 4, seed=6)

    with caplog.at_level(logging.DEBUG, logger="cifar2.backprop"):
        run_manual_backward(model, CrossEntropy(), x, y)

    assert [record for record in caplog.records if record.name == "cifar2.backprop"] == []


@pytest.mark.parametrize("shape", [(5, 3), (4, 2), (4,), (1, 4, 3)])
def test_mismatched_output_gradient_raises(shape):
    model = seeded_model([6, 5, 3], ["tanh", "identity"])
    x, _ = make_batch(model, "cross_entropy", 4, seed=7)
    with torch.no_grad():
        model(x)

    # The message names the output's shape.
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        backward(model, torch.ones(shape, dtype=torch.float64))


def test_backward_before_forward_raises_value_error():
    model = seeded_model([6, 5, 3], ["tanh", "identity"])

    with pytest.raises(ValueError):
        backward(model, torch.ones(4, 3, dtype=torch.float64))


def test_backward_after_float32_conversion():
    model = seeded_model([6, 5, 4, 3], ["tanh", "relu", "identity"])
    loss = CrossEntropy()
    x, y = make_batch(model, "cross_entropy", 7, seed=8)
    # A first pass in float64 fills the gradient slots with float64 tensors.
    run_manual_backward(model, loss, x, y)

    model.to(torch.float32)
    x = x.to(torch.float32)
    reference = autograd_reference(model, loss, x, y)
    run_manual_backward(model, loss, x, y)

    for l in range(1, model.L + 1):
        weight_reference, bias_reference = reference[l]
        assert model.dL_dw[l].dtype == torch.float32, f"dL_dw[{l}]"
        assert model.dL_db[l].dtype == torch.float32, f"dL_db[{l}]"
        assert relative_difference(weight_reference, model.dL_dw[l]) <= TOLERANCE_FLOAT32, f"dL_dw[{l}]"
        assert relative_difference(bias_reference, model.dL_db[l]) <= TOLERANCE_FLOAT32, f"dL_db[{l}]"
        assert torch.equal(model.linear(l).weight.grad, model.dL_dw[l]), f"layer {l} weight.grad"
