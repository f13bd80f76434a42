"""The gradient checker: relative error, finite differences at ReLU kinks, sampling, and
whether it catches a broken backward pass."""

from __future__ import annotations

import math

import pytest
import torch

from cifar2.gradcheck import StepGradientCheck, check_gradients, finite_differences, relative_error
from cifar2.losses import CrossEntropy, SumSquaredError
from cifar2.network import MLP
from cifar2.training import OptimizerConfig, Trainer

STEP = 1e-6
TOLERANCE_AUTOGRAD = 1e-10
TOLERANCE_FINITE_DIFF = 1e-6
# A ReLU pre-activation farther than this from 0 cannot change sign when a parameter of the small
# networks below moves by STEP, because their inputs and weights are O(1).
SAFE_DISTANCE_FROM_KINK = 1e-3


def seeded_model(sizes: list[int], activations: list[str], seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(sizes, activations)


def class_batch(n_inputs: int, n_classes: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, n_inputs, generator=generator, dtype=torch.float64)
    y = torch.randint(0, n_classes, (batch_size,), generator=generator)
    return x, y


def make_backward(flip_sign_layer: int | None = None, skip_derivative_layer: int | None = None,
                  halve_bias_layer: int | None = None):
    """Build a manual backward pass with ``backprop.backward``'s signature and an optional bug.

    ``flip_sign_layer`` negates dL/dz of that layer (and so of every layer below it),
    ``skip_derivative_layer`` leaves out that layer's activation derivative, and
    ``halve_bias_layer`` halves that layer's bias gradient. With no bug it is a correct,
    separately written backward pass.
    """

    def backward_fn(model: MLP, dL_dout: torch.Tensor, store_grad: bool = True, debug: bool = False) -> None:
        with torch.no_grad():
            upstream = dL_dout  # dL/da[l]
            for l in range(model.L, 0, -1):
                if l == skip_derivative_layer:
                    dL_dz = upstream.clone()
                else:
                    dL_dz = upstream * model.f[l].derivative(model.z[l], model.a[l])
                if l == flip_sign_layer:
                    dL_dz = -dL_dz

                weight = model.linear(l).weight
                model.dL_dw[l] = dL_dz.T @ model.a[l - 1]
                model.dL_db[l] = dL_dz.sum(dim=0)
                if l == halve_bias_layer:
                    model.dL_db[l] = model.dL_db[l] / 2
                upstream = dL_dz @ weight

                if store_grad:
                    model.linear(l).weight.grad = model.dL_dw[l].clone()
                    model.linear(l).bias.grad = model.dL_db[l].clone()

    return backward_fn


BROKEN_BACKWARDS = {
    "sign_flipped_in_layer_2": make_backward(flip_sign_layer=2),
    "activation_derivative_missing_in_layer_1": make_backward(skip_derivative_layer=1),
    "bias_gradient_halved_in_layer_3": make_backward(halve_bias_layer=3),
}


def kinked_relu_model() -> tuple[MLP, torch.Tensor, torch.Tensor]:
    """Return a ReLU network whose unit 0 of layer 1 has z = 1e-9 (well within STEP of 0) for sample 0."""
    model = seeded_model([3, 4, 2], ["relu", "identity"], seed=11)
    x, y = class_batch(3, 2, 5, seed=11)
    with torch.no_grad():
        model(x)
        model.linear(1).bias[0] += 1e-9 - model.z[1][0, 0]
        model(x)
    return model, x, y


def test_relative_error_equal_tensors_is_zero():
    tensor = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float64)

    assert relative_error(tensor, tensor.clone()) == 0.0


def test_relative_error_both_zero_is_zero():
    zeros = torch.zeros(4, dtype=torch.float64)

    assert relative_error(zeros, zeros.clone()) == 0.0


def test_relative_error_symmetric():
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(10, generator=generator, dtype=torch.float64)
    b = torch.randn(10, generator=generator, dtype=torch.float64)

    assert relative_error(a, b) == relative_error(b, a)


def test_relative_error_opposite_tensors_is_one():
    tensor = torch.tensor([3.0, -4.0], dtype=torch.float64)

    assert relative_error(tensor, -tensor) == pytest.approx(1.0, rel=1e-15)


def test_relative_error_one_side_zero_is_one():
    tensor = torch.tensor([3.0, -4.0], dtype=torch.float64)

    assert relative_error(tensor, torch.zeros(2, dtype=torch.float64)) == pytest.approx(1.0, rel=1e-15)


def test_relative_error_ignores_scale():
    a = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    b = torch.tensor([1.0, 2.0, 3.5], dtype=torch.float64)

    assert relative_error(1e-8 * a, 1e-8 * b) == pytest.approx(relative_error(a, b), rel=1e-12)


@pytest.mark.parametrize("loss", [CrossEntropy(), SumSquaredError()], ids=["cross_entropy", "sse"])
def test_check_gradients_passes_tanh_network(loss):
    model = seeded_model([5, 4, 3, 2], ["tanh", "tanh", "identity"], seed=3)
    x, y = class_batch(5, 2, 6, seed=3)
    if isinstance(loss, SumSquaredError):
        y = torch.randn(6, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    case = check_gradients(model, loss, x, y, step=STEP, max_entries=25, seed=0)

    assert len(case.layers) == model.L
    assert case.max_error_autograd <= TOLERANCE_AUTOGRAD
    assert case.max_error_finite_diff <= TOLERANCE_FINITE_DIFF


def test_check_gradients_passes_unbroken_variant():
    """The hand-written backward pass without a bug passes, so the failures below come from the bugs."""
    model = seeded_model([5, 4, 3, 2], ["tanh", "tanh", "identity"], seed=3)
    x, y = class_batch(5, 2, 6, seed=3)

    case = check_gradients(model, CrossEntropy(), x, y, step=STEP, max_entries=25, seed=0,
                           backward_fn=make_backward())

    assert case.max_error_autograd <= TOLERANCE_AUTOGRAD
    assert case.max_error_finite_diff <= TOLERANCE_FINITE_DIFF


@pytest.mark.parametrize("bug", sorted(BROKEN_BACKWARDS))
def test_check_gradients_catches_broken_backward(bug):
    model = seeded_model([5, 4, 3, 2], ["tanh", "tanh", "identity"], seed=3)
    x, y = class_batch(5, 2, 6, seed=3)

    case = check_gradients(model, CrossEntropy(), x, y, step=STEP, max_entries=25, seed=0,
                           backward_fn=BROKEN_BACKWARDS[bug])

    assert case.max_error_autograd > TOLERANCE_AUTOGRAD
    assert case.max_error_finite_diff > TOLERANCE_FINITE_DIFF


def test_finite_differences_restore_parameters():
    model = seeded_model([4, 3, 2], ["tanh", "identity"], seed=5)
    x, y = class_batch(4, 2, 5, seed=5)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}

    for name in before:
        finite_differences(model, CrossEntropy(), x, y, name, STEP, max_entries=25,
                           generator=torch.Generator().manual_seed(0))

    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name


def test_kink_spoils_central_difference():
    """Kinks are skipped because a central difference across one misses the gradient."""
    model, x, y = kinked_relu_model()
    loss = CrossEntropy()
    bias = model.linear(1).bias
    with torch.enable_grad():
        manual = torch.autograd.grad(loss(model(x), y), bias)[0][0].item()

    with torch.no_grad():
        original = bias[0].item()
        bias[0] = original + STEP
        loss_plus = loss(model(x), y).item()
        bias[0] = original - STEP
        loss_minus = loss(model(x), y).item()
        bias[0] = original
    estimate = (loss_plus - loss_minus) / (2 * STEP)

    assert abs(estimate - manual) / (abs(estimate) + abs(manual)) > TOLERANCE_FINITE_DIFF


def test_finite_differences_skip_relu_kink():
    model, x, y = kinked_relu_model()
    z = model.z[1]
    others = torch.cat([z[0, 1:], z[1:].flatten()])
    assert 0 < z[0, 0].item() < STEP
    assert others.abs().min().item() > SAFE_DISTANCE_FROM_KINK

    result = finite_differences(model, CrossEntropy(), x, y, "layers.0.bias", STEP, max_entries=4,
                                generator=torch.Generator().manual_seed(0))

    assert result.skipped_at_kink == 1
    assert 0 not in result.entries.tolist()
    assert sorted(result.entries.tolist()) == [1, 2, 3]


def test_check_gradients_no_false_alarm_at_kink():
    model, x, y = kinked_relu_model()

    case = check_gradients(model, CrossEntropy(), x, y, step=STEP, max_entries=25, seed=0)

    assert sum(layer.skipped_at_kink for layer in case.layers) > 0
    assert case.max_error_autograd <= TOLERANCE_AUTOGRAD
    assert case.max_error_finite_diff <= TOLERANCE_FINITE_DIFF


def test_finite_differences_skip_nothing_without_kink():
    model = seeded_model([3, 4, 2], ["relu", "identity"], seed=11)
    x, y = class_batch(3, 2, 5, seed=11)
    with torch.no_grad():
        model(x)
    assert model.z[1].abs().min().item() > SAFE_DISTANCE_FROM_KINK

    for name, parameter in model.named_parameters():
        result = finite_differences(model, CrossEntropy(), x, y, name, STEP, max_entries=25,
                                    generator=torch.Generator().manual_seed(0))
        assert result.skipped_at_kink == 0, name
        assert result.entries.numel() == min(parameter.numel(), 25), name


def test_finite_differences_sample_large_parameter():
    model = seeded_model([6, 5, 3], ["tanh", "identity"], seed=6)
    x, y = class_batch(6, 3, 4, seed=6)
    assert model.linear(1).weight.numel() == 30

    result = finite_differences(model, CrossEntropy(), x, y, "layers.0.weight", STEP, max_entries=10,
                                generator=torch.Generator().manual_seed(0))
    entries = result.entries.tolist()

    assert len(entries) == 10
    assert len(set(entries)) == 10
    assert all(0 <= index < 30 for index in entries)
    assert result.estimates.shape == (10,)


def test_finite_differences_cover_small_parameter():
    model = seeded_model([6, 5, 3], ["tanh", "identity"], seed=6)
    x, y = class_batch(6, 3, 4, seed=6)

    result = finite_differences(model, CrossEntropy(), x, y, "layers.0.bias", STEP, max_entries=10,
                                generator=torch.Generator().manual_seed(0))

    assert sorted(result.entries.tolist()) == [0, 1, 2, 3, 4]


def test_check_gradients_counts_sampled_entries():
    model = seeded_model([6, 5, 3], ["tanh", "identity"], seed=6)
    x, y = class_batch(6, 3, 4, seed=6)

    case = check_gradients(model, CrossEntropy(), x, y, step=STEP, max_entries=10, seed=0)

    # Layer 1: weight 5x6 = 30 entries sampled down to 10, bias 5. Layer 2: weight 3x5 = 15 sampled
    # down to 10, bias 3.
    assert [layer.entries_checked for layer in case.layers] == [10 + 5, 10 + 3]
    assert [layer.skipped_at_kink for layer in case.layers] == [0, 0]


def step_check_run(mode: str, backward_fn=None, epochs: int = 2) -> StepGradientCheck:
    torch.manual_seed(3)
    model = MLP([6, 5, 4, 3], ["relu", "tanh", "identity"])
    x, y = class_batch(6, 3, 20, seed=3)
    options = {} if backward_fn is None else {"backward_fn": backward_fn}
    check = StepGradientCheck(model, CrossEntropy(), **options)
    trainer = Trainer(model, mode, OptimizerConfig(lr=0.1, momentum=0.9, weight_decay=0.01),
                      x[:16], y[:16], x[16:], y[16:], batch_size=8, before_update=check)
    for _ in range(epochs):
        trainer.run_epoch()
    return check


@pytest.mark.parametrize("mode", ["torch", "manual_update"])
def test_step_check_passes_correct_backward(mode):
    check = step_check_run(mode)

    assert check.steps == 4
    assert check.max_error <= TOLERANCE_AUTOGRAD


@pytest.mark.parametrize("bug", BROKEN_BACKWARDS)
def test_step_check_catches_broken_backward(bug):
    check = step_check_run("torch", BROKEN_BACKWARDS[bug])

    assert check.max_error > 1e-3


def test_step_check_needs_autograd_gradients():
    with pytest.raises(ValueError, match="mode torch or manual_update"):
        step_check_run("manual")


def test_step_check_fails_on_nan_gradient():
    def nan_backward(model: MLP, dL_dout: torch.Tensor, store_grad: bool = True, debug: bool = False) -> None:
        make_backward()(model, dL_dout, store_grad=store_grad)
        model.dL_dw[1] = torch.full_like(model.dL_dw[1], float("nan"))

    check = step_check_run("torch", nan_backward)

    assert math.isnan(check.max_error)
    assert not check.max_error <= TOLERANCE_AUTOGRAD
