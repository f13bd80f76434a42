"""The training loop: agreement of the three modes, the history, divergence, repeatability and
``evaluate``."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from cifar2.network import MLP
from cifar2.training import MODES, OptimizerConfig, Trainer, build_model, evaluate, train

N_INPUTS = 3 * 32 * 32
HIDDEN_SIZES = [16, 8]
N_TRAIN = 40
BATCH_SIZE = 16  # 40 samples make batches of 16, 16 and 8
EPOCHS = 3
SEED = 265
TOLERANCE_MANUAL = 1e-10
COMPARE_CONFIG = OptimizerConfig(lr=0.01, momentum=0.9, weight_decay=0.01)
MODE_CONFIGS = {
    "momentum_weight_decay": COMPARE_CONFIG,
    "dampening": OptimizerConfig(lr=0.01, momentum=0.9, dampening=0.3, weight_decay=0.01),
    "nesterov": OptimizerConfig(lr=0.01, momentum=0.9, nesterov=True),
}


def relative_difference(reference: float | torch.Tensor, value: float | torch.Tensor) -> float:
    reference = torch.as_tensor(reference, dtype=torch.float64)
    value = torch.as_tensor(value, dtype=torch.float64)
    denominator = (reference.norm() + value.norm()).item()
    if denominator == 0.0:
        return 0.0
    return (reference - value).norm().item() / denominator


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random images of 3x32x32 flattened, with labels from a fixed linear rule so training has signal."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + 10, N_INPUTS, generator=generator, dtype=torch.float64)
    direction = torch.randn(N_INPUTS, generator=generator, dtype=torch.float64)
    y = (x @ direction > 0).long()
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def small_model(seed: int = SEED) -> MLP:
    return build_model(HIDDEN_SIZES, "relu", 2, seed, torch.float64)


def parameters_of(model: MLP) -> list[torch.Tensor]:
    return [parameter.detach().clone() for parameter in model.parameters()]


def run(data, mode: str, config: OptimizerConfig, epochs: int = EPOCHS, shuffle: bool = False,
        seed: int = SEED, model: MLP | None = None):
    model = small_model() if model is None else model
    result = train(model, mode, config, *data, epochs=epochs, batch_size=BATCH_SIZE, shuffle=shuffle,
                   seed=seed)
    return result, model


def test_build_model_same_seed_same_weights():
    first, second = small_model(), small_model()

    for (name, a), b in zip(first.named_parameters(), second.parameters()):
        assert torch.equal(a, b), name


def test_build_model_other_seed_other_weights():
    first, second = small_model(SEED), small_model(SEED + 1)

    assert not torch.equal(first.linear(1).weight, second.linear(1).weight)


@pytest.mark.parametrize("config_name", sorted(MODE_CONFIGS))
def test_manual_update_bit_identical_to_torch(data, config_name):
    config = MODE_CONFIGS[config_name]
    torch_result, torch_model = run(data, "torch", config)
    manual_result, manual_model = run(data, "manual_update", config)

    assert len(torch_result.history) == EPOCHS
    assert manual_result.history == torch_result.history
    for (name, a), b in zip(torch_model.named_parameters(), manual_model.parameters()):
        assert torch.equal(a, b), name
    for (name, trained), initial in zip(torch_model.named_parameters(), parameters_of(small_model())):
        assert not torch.equal(trained, initial), f"{name} never moved"


@pytest.mark.parametrize("config_name", sorted(MODE_CONFIGS))
def test_manual_close_to_torch(data, config_name):
    config = MODE_CONFIGS[config_name]
    torch_result, torch_model = run(data, "torch", config)
    manual_result, manual_model = run(data, "manual", config)

    assert len(manual_result.history) == len(torch_result.history)
    for torch_row, manual_row in zip(torch_result.history, manual_result.history):
        assert manual_row.keys() == torch_row.keys()
        for key in torch_row:
            where = f"epoch {torch_row['epoch']}, {key}"
            assert relative_difference(torch_row[key], manual_row[key]) <= TOLERANCE_MANUAL, where
    for (name, a), b in zip(torch_model.named_parameters(), manual_model.parameters()):
        assert relative_difference(a.detach(), b.detach()) <= TOLERANCE_MANUAL, name


def test_modes_agree_on_experiment_network():
    """The 3072-512-128-32-2 network of params.yaml, for one epoch of 6 samples in batches of 4."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(8, N_INPUTS, generator=generator, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    models = {mode: build_model([512, 128, 32], "relu", 2, SEED, torch.float64) for mode in MODES}

    results = {mode: train(models[mode], mode, COMPARE_CONFIG, x[:6], y[:6], x[6:], y[6:], epochs=1,
                           batch_size=4) for mode in MODES}

    assert results["manual_update"].history == results["torch"].history
    for (name, a), b in zip(models["torch"].named_parameters(), models["manual_update"].parameters()):
        assert torch.equal(a, b), f"manual_update {name}"
    for (name, a), b in zip(models["torch"].named_parameters(), models["manual"].parameters()):
        assert relative_difference(a.detach(), b.detach()) <= TOLERANCE_MANUAL, f"manual {name}"


@pytest.mark.parametrize("shuffle", [False, True], ids=["stored_order", "shuffled"])
@pytest.mark.parametrize("mode", MODES)
def test_train_loss_is_mean_over_samples(data, mode, shuffle):
    train_x, train_y = data[0], data[1]
    model = small_model()
    initial = parameters_of(model)
    with torch.no_grad():
        output = model(train_x)
    true_mean = F.cross_entropy(output, train_y).item()
    true_accuracy = (output.argmax(dim=1) == train_y).double().mean().item()
    batch_means = [F.cross_entropy(output[start:start + BATCH_SIZE], train_y[start:start + BATCH_SIZE]).item()
                   for start in range(0, N_TRAIN, BATCH_SIZE)]
    # The unweighted mean of the batch means differs from the true mean, so the test can tell them apart.
    assert relative_difference(true_mean, sum(batch_means) / len(batch_means)) > 1e-6

    # lr = 0 keeps the weights fixed, so every batch is evaluated with the initial model.
    result, model = run(data, mode, OptimizerConfig(lr=0.0), epochs=1, shuffle=shuffle, model=model)

    for (name, parameter), start in zip(model.named_parameters(), initial):
        assert torch.equal(parameter, start), name
    assert relative_difference(true_mean, result.history[0]["train_loss"]) <= 1e-12
    assert result.history[0]["train_accuracy"] == true_accuracy


@pytest.mark.parametrize("mode", MODES)
def test_diverging_run_is_recorded(data, mode, caplog):
    # Weight decay 0.9 with lr 1e6 scales the weights by about -9e5 per step (more with momentum),
    # so float64 overflows within a few epochs.
    config = OptimizerConfig(lr=1e6, momentum=0.9, weight_decay=0.9)
    epochs = 30

    with caplog.at_level(logging.WARNING, logger="cifar2.training"):
        result, _ = run(data, mode, config, epochs=epochs)

    assert result.diverged
    assert result.diverged_epoch is not None
    assert result.diverged_epoch <= epochs
    assert len(result.history) == result.diverged_epoch - 1
    assert all(math.isfinite(row["train_loss"]) for row in result.history)
    assert any("diverged" in record.getMessage() for record in caplog.records)


def test_diverged_trainer_stops(data):
    config = OptimizerConfig(lr=1e6, momentum=0.9, weight_decay=0.9)
    trainer = Trainer(small_model(), "manual", config, *data, batch_size=BATCH_SIZE)
    rows = [trainer.run_epoch() for _ in range(30)]
    assert trainer.result.diverged
    finished = len(trainer.result.history)

    assert rows[finished] is None
    assert all(row is None for row in rows[finished:])
    assert trainer.run_epoch() is None
    assert len(trainer.result.history) == finished


def test_nonfinite_last_epoch_marks_diverged(data):
    # With one batch per epoch, each epoch takes a single step and then evaluates, so the epoch
    # whose step makes the weights overflow still has a finite training loss; the check of the
    # weights and the validation loss after the step must catch it.
    config = OptimizerConfig(lr=1e6, momentum=0.9, weight_decay=0.9)
    trainer = Trainer(small_model(), "manual", config, *data, batch_size=N_TRAIN)
    rows = []
    for _ in range(30):
        row = trainer.run_epoch()
        if row is None:
            break
        rows.append(row)

    result = trainer.finish()

    assert result.diverged
    assert result.diverged_epoch == len(rows) + 1
    assert all(math.isfinite(row["val_loss"]) for row in rows)
    assert all(math.isfinite(row["train_loss"]) for row in rows)


@pytest.mark.parametrize("shuffle", [False, True], ids=["stored_order", "shuffled"])
@pytest.mark.parametrize("mode", MODES)
def test_same_seed_repeats_run(data, mode, shuffle):
    first_result, first_model = run(data, mode, COMPARE_CONFIG, shuffle=shuffle)
    second_result, second_model = run(data, mode, COMPARE_CONFIG, shuffle=shuffle)

    assert second_result.history == first_result.history
    for (name, a), b in zip(first_model.named_parameters(), second_model.parameters()):
        assert torch.equal(a, b), name


def test_shuffle_changes_batch_order(data):
    # With the same initial weights and lr > 0, only the order of the batches can change the loss
    # of the first epoch.
    stored_result, _ = run(data, "manual", COMPARE_CONFIG, epochs=1, shuffle=False)
    shuffled_result, _ = run(data, "manual", COMPARE_CONFIG, epochs=1, shuffle=True)

    assert shuffled_result.history[0]["train_loss"] != stored_result.history[0]["train_loss"]


def test_shuffle_seed_changes_batch_order(data):
    first_result, _ = run(data, "manual", COMPARE_CONFIG, epochs=1, shuffle=True, seed=1)
    second_result, _ = run(data, "manual", COMPARE_CONFIG, epochs=1, shuffle=True, seed=2)

    assert first_result.history[0]["train_loss"] != second_result.history[0]["train_loss"]


def test_evaluate_matches_full_batch(data):
    x, y = data[0][:23], data[1][:23]
    model = small_model()
    with torch.no_grad():
        output = model(x)

    loss, accuracy, predicted = evaluate(model, x, y, batch_size=5)

    assert torch.equal(predicted, output.argmax(dim=1))
    assert accuracy == (predicted == y).double().mean().item()
    assert relative_difference(F.cross_entropy(output, y).item(), loss) <= 1e-12


def test_evaluate_known_predictions():
    # Identity weights make the logits equal the inputs, so the larger input is the predicted class.
    model = MLP([2, 2], ["identity"])
    with torch.no_grad():
        model.linear(1).weight.copy_(torch.eye(2, dtype=torch.float64))
        model.linear(1).bias.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1])

    loss, accuracy, predicted = evaluate(model, x, y, batch_size=3)

    assert predicted.tolist() == [0, 1, 0, 1]
    assert accuracy == 0.75
    assert loss == pytest.approx(F.cross_entropy(x, y).item(), rel=1e-12)


def test_unknown_mode_raises(data):
    with pytest.raises(ValueError, match="adam"):
        Trainer(small_model(), "adam", COMPARE_CONFIG, *data, batch_size=BATCH_SIZE)


@pytest.mark.parametrize("mode", MODES)
def test_before_update_runs_before_each_step(data, mode):
    model = small_model()
    calls = []

    def before_update(output: torch.Tensor, y: torch.Tensor) -> None:
        calls.append((output.shape[0], y.shape[0], parameters_of(model)))

    trainer = Trainer(model, mode, COMPARE_CONFIG, *data, batch_size=BATCH_SIZE, before_update=before_update)
    weights_at_start = parameters_of(model)
    trainer.run_epoch()

    assert [(n_outputs, n_labels) for n_outputs, n_labels, _ in calls] == [(16, 16), (16, 16), (8, 8)]
    # The first call gets the initial weights, because the optimizer has not moved them yet.
    for before, start in zip(calls[0][2], weights_at_start):
        assert torch.equal(before, start)
    for before, start in zip(calls[1][2], weights_at_start):
        assert not torch.equal(before, start)
