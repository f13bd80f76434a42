"""Stage compare: train one configuration in the three modes and measure how far they drift apart.

The modes (torch, manual_update, manual) start from identical weights and advance in lockstep,
one epoch at a time, so their parameters can be compared after every epoch without storing them.
Three checks decide whether the stage passes:

1. manual_update against torch over the whole run, which tests the manual SGD
   (``compare.tol_manual_update``, 0 for bit-identical).
2. The manual backward pass against autograd at every step of the torch run, on the weights and
   batch of that step (``compare.tol_gradient``).
3. The fully manual run against torch over its first ``compare.tol_manual_epochs`` epochs
   (``compare.tol_manual``). Later epochs are measured and plotted but not checked, because long
   runs can separate: a last-bit difference in the loss gradient grows until it switches a ReLU
   unit, and from then on the two runs follow different, equally valid trajectories.

A fourth run, ``torch_perturbed``, is the control for check 3: mode torch from the same weights
with one weight moved by one unit in the last place (ulp). It shows how far torch itself drifts
from a last-bit change, and it is reported, not checked.
"""

import logging
import math
from pathlib import Path

import torch
from tqdm import tqdm

from cifar2 import figures
from cifar2.data import load_splits
from cifar2.errors import VerificationError
from cifar2.gradcheck import StepGradientCheck, largest, relative_error
from cifar2.losses import CrossEntropy
from cifar2.outputs import remove_outputs, write_csv, write_json
from cifar2.params import load_params
from cifar2.stage import resolve_device, resolve_dtype, run_stage
from cifar2.training import MODES, OptimizerConfig, Trainer, build_model

PARAMS = (
    "base.seed",
    "base.dtype",
    "base.device",
    "model.hidden_sizes",
    "model.activation",
    "train.epochs",
    "train.batch_size",
    "train.shuffle",
    "compare.lr",
    "compare.weight_decay",
    "compare.momentum",
    "compare.tol_manual_update",
    "compare.tol_gradient",
    "compare.tol_manual",
    "compare.tol_manual_epochs",
)
EXTRACTED = Path("data/cifar2.npz")
SPLIT = Path("data/split.npz")
METRICS = Path("metrics/compare.json")
PLOT_DATA = Path("plots/compare.csv")
FIGURE = Path("plots/compare.png")

CONTROL = "torch_perturbed"

logger = logging.getLogger("stages.compare")


def parameter_difference(model_a, model_b) -> float:
    """Largest relative difference over the parameter tensors of two models."""
    return max(relative_error(a.detach(), b.detach())
               for a, b in zip(model_a.parameters(), model_b.parameters()))


def scalar_difference(a: float, b: float) -> float:
    """``|a - b| / (|a| + |b|)`` in float64, the scalar form of ``relative_error``."""
    return relative_error(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))


def perturb_one_weight(model) -> None:
    """Move weight ``W[1][0, 0]`` to the next representable value above it, a one-ulp change."""
    with torch.no_grad():
        weight = model.linear(1).weight
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(math.inf, dtype=weight.dtype,
                                                                  device=weight.device))


def check_run(rows: list[dict], mode: str, tolerance: float, epochs_checked: int, tolerance_key: str,
              failures: list[str], hint: str = "") -> dict:
    """Check a mode's run against torch over its first ``epochs_checked`` epochs.

    Returns the metrics of the comparison and appends a message to ``failures`` if it fails.
    ``separation_epoch`` is the first epoch whose loss or parameter difference exceeds the
    tolerance, checked or not.
    """
    checked = rows[:epochs_checked]
    loss_diff = largest(row[f"loss_diff_{mode}"] for row in checked)
    param_diff = largest(row[f"param_diff_{mode}"] for row in checked)
    separation = next((row["epoch"] for row in rows
                       if not largest([row[f"loss_diff_{mode}"], row[f"param_diff_{mode}"]]) <= tolerance), None)
    result = {
        "max_loss_diff": largest(row[f"loss_diff_{mode}"] for row in rows),
        "final_param_diff": rows[-1][f"param_diff_{mode}"],
        "epochs_checked": len(checked),
        "max_loss_diff_checked": loss_diff,
        "max_param_diff_checked": param_diff,
        "separation_epoch": separation,
        "tolerance": tolerance,
        "passed": loss_diff <= tolerance and param_diff <= tolerance,
    }
    logger.info("%s vs torch: over the first %d epochs, largest loss difference %.3e and parameter "
                "difference %.3e (tolerance %g). Over all %d epochs: loss %.3e, final parameters %.3e%s.",
                mode, len(checked), loss_diff, param_diff, tolerance, len(rows), result["max_loss_diff"],
                result["final_param_diff"],
                "" if separation is None else f"; the runs separate beyond the tolerance in epoch {separation}")
    if not result["passed"]:
        failures.append(f"{mode} vs torch over the first {len(checked)} epochs: loss {loss_diff:.3e}, "
                        f"parameters {param_diff:.3e} > {tolerance_key} = {tolerance:g}{hint}")
    return result


def check_step_gradients(check: StepGradientCheck, tolerance: float, failures: list[str]) -> dict:
    """Check the largest per-step gradient error of the manual backward pass against autograd."""
    passed = check.max_error <= tolerance
    logger.info("Manual backward vs autograd at each of %d steps of the torch run: largest relative "
                "error %.3e (tolerance %g).", check.steps, check.max_error, tolerance)
    if not passed:
        failures.append(f"manual backward vs autograd: relative error {check.max_error:.3e} > "
                        f"compare.tol_gradient = {tolerance:g} (run python -m stages.gradcheck --debug "
                        "to find the layer, or raise the tolerance for float32)")
    return {"max_relative_error": check.max_error, "steps": check.steps, "seconds": check.seconds,
            "tolerance": tolerance, "passed": passed}


def main() -> None:
    params = load_params(PARAMS)
    remove_outputs([METRICS, PLOT_DATA, FIGURE])
    dtype, device = resolve_dtype(params["base.dtype"]), resolve_device(params["base.device"])
    splits = load_splits(EXTRACTED, SPLIT, dtype, device)
    config = OptimizerConfig(lr=params["compare.lr"], momentum=params["compare.momentum"],
                             weight_decay=params["compare.weight_decay"])
    logger.info("Training %s for %d epochs in modes %s, and the control %s (mode torch, one weight "
                "moved by one ulp).", config, params["train.epochs"], ", ".join(MODES), CONTROL)
    if params["compare.tol_manual_epochs"] > params["train.epochs"]:
        logger.warning("compare.tol_manual_epochs = %d exceeds train.epochs = %d, so the manual run is "
                       "checked over all %d epochs.", params["compare.tol_manual_epochs"],
                       params["train.epochs"], params["train.epochs"])

    # Each run's training mode; the control trains like torch.
    runs = {**{mode: mode for mode in MODES}, CONTROL: "torch"}
    trainers = {}
    gradient_check = None
    for name, mode in runs.items():
        model = build_model(params["model.hidden_sizes"], params["model.activation"],
                            len(splits.class_names), params["base.seed"], dtype, device)
        before_update = None
        if name == "torch":
            gradient_check = before_update = StepGradientCheck(model, CrossEntropy())
        elif name == CONTROL:
            perturb_one_weight(model)
        trainers[name] = Trainer(model, mode, config, splits.train_x, splits.train_y, splits.val_x,
                                 splits.val_y, params["train.batch_size"], params["train.shuffle"],
                                 params["base.seed"], description=name, before_update=before_update)
    if parameter_difference(trainers["torch"].model, trainers["manual"].model) != 0.0:
        raise VerificationError("The three modes did not start from identical weights; "
                                "build_model must seed right before creating each model.")

    rows = []
    for epoch in tqdm(range(1, params["train.epochs"] + 1), desc="compare", unit="epoch"):
        epoch_rows = {mode: trainer.run_epoch() for mode, trainer in trainers.items()}
        if any(row is None for row in epoch_rows.values()):
            diverged = [mode for mode, row in epoch_rows.items() if row is None]
            raise VerificationError(f"Mode(s) {', '.join(diverged)} diverged in epoch {epoch} with "
                                    f"{config}. Lower compare.lr or compare.momentum.")
        reference = epoch_rows["torch"]["train_loss"]
        row = {"epoch": epoch}
        row.update({f"loss_{name}": epoch_rows[name]["train_loss"] for name in trainers})
        for mode in ("manual_update", "manual", CONTROL):
            row[f"loss_diff_{mode}"] = scalar_difference(epoch_rows[mode]["train_loss"], reference)
            row[f"param_diff_{mode}"] = parameter_difference(trainers[mode].model,
                                                             trainers["torch"].model)
        # log10 copies for the DVC plot, whose axes are linear; an exact match (0) is drawn at -18.
        for key in [key for key in row if "_diff_" in key]:
            row[f"log10_{key}"] = math.log10(max(row[key], 1e-18))
        rows.append(row)
    results = {mode: trainer.finish() for mode, trainer in trainers.items()}

    metrics = {"config": {"lr": config.lr, "weight_decay": config.weight_decay,
                          "momentum": config.momentum}}
    failures = []
    metrics["manual_update_vs_torch"] = check_run(
        rows, "manual_update", params["compare.tol_manual_update"], len(rows), "compare.tol_manual_update",
        failures, " (the manual SGD no longer matches torch.optim.SGD: see tests/test_optimizer.py)")
    metrics["manual_vs_torch"] = check_run(
        rows, "manual", params["compare.tol_manual"], params["compare.tol_manual_epochs"], "compare.tol_manual",
        failures, " (raise compare.tol_manual for float32, or lower compare.tol_manual_epochs if the runs "
                  "separate early)")
    metrics["manual_backward_vs_autograd"] = check_step_gradients(gradient_check, params["compare.tol_gradient"],
                                                                  failures)
    # The control is measured like the manual run, but its result never fails the stage.
    metrics[f"{CONTROL}_vs_torch"] = check_run(rows, CONTROL, params["compare.tol_manual"],
                                               params["compare.tol_manual_epochs"], "compare.tol_manual", [])
    # The torch run's loop also ran the per-step check, whose time is reported on its own.
    results["torch"].train_seconds -= gradient_check.seconds
    metrics["final"] = {mode: {"train_loss": result.final_train_loss,
                               "train_accuracy": result.final_train_accuracy,
                               "val_accuracy": result.final_val_accuracy,
                               "train_seconds": result.train_seconds}
                        for mode, result in results.items()}
    if failures:
        raise VerificationError("The manual code disagrees with PyTorch beyond tolerance: "
                                + "; ".join(failures) + ". The stage wrote no outputs; under DVC the "
                                "previous ones are gone, and git checkout metrics plots restores the "
                                "committed ones.")

    write_json(METRICS, metrics)
    write_csv(PLOT_DATA, rows)
    figures.compare_curves({mode: result.history for mode, result in results.items()}, rows, FIGURE)


if __name__ == "__main__":
    run_stage(main)
