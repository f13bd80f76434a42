"""Stage compare: train one configuration in the three modes and measure how far they drift apart.

The modes (torch, manual_update, manual) start from identical weights and advance in lockstep,
one epoch at a time, so their parameters can be compared after every epoch without storing them.
"""

import logging
import math
from pathlib import Path

import torch
from tqdm import tqdm

from cifar2 import figures
from cifar2.data import load_splits
from cifar2.errors import VerificationError
from cifar2.gradcheck import relative_error
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
    "compare.tol_manual",
)
EXTRACTED = Path("data/cifar2.npz")
SPLIT = Path("data/split.npz")
METRICS = Path("metrics/compare.json")
PLOT_DATA = Path("plots/compare.csv")
FIGURE = Path("plots/compare.png")

logger = logging.getLogger("stages.compare")


def parameter_difference(model_a, model_b) -> float:
    """Largest relative difference over the parameter tensors of two models."""
    return max(relative_error(a.detach(), b.detach())
               for a, b in zip(model_a.parameters(), model_b.parameters()))


def scalar_difference(a: float, b: float) -> float:
    """``|a - b| / (|a| + |b|)`` in float64, the scalar form of ``relative_error``."""
    return relative_error(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))


def main() -> None:
    params = load_params(PARAMS)
    remove_outputs([METRICS, PLOT_DATA, FIGURE])
    dtype, device = resolve_dtype(params["base.dtype"]), resolve_device(params["base.device"])
    splits = load_splits(EXTRACTED, SPLIT, dtype, device)
    config = OptimizerConfig(lr=params["compare.lr"], momentum=params["compare.momentum"],
                             weight_decay=params["compare.weight_decay"])
    logger.info("Training %s for %d epochs in modes %s.", config, params["train.epochs"],
                ", ".join(MODES))

    trainers = {}
    for mode in MODES:
        model = build_model(params["model.hidden_sizes"], params["model.activation"],
                            len(splits.class_names), params["base.seed"], dtype, device)
        trainers[mode] = Trainer(model, mode, config, splits.train_x, splits.train_y, splits.val_x,
                                 splits.val_y, params["train.batch_size"], params["train.shuffle"],
                                 params["base.seed"], description=mode)
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
        row.update({f"loss_{mode}": epoch_rows[mode]["train_loss"] for mode in MODES})
        for mode in ("manual_update", "manual"):
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
    for mode, tolerance_key in (("manual_update", "compare.tol_manual_update"),
                                ("manual", "compare.tol_manual")):
        tolerance = params[tolerance_key]
        loss_diff = max(row[f"loss_diff_{mode}"] for row in rows)
        param_diff = rows[-1][f"param_diff_{mode}"]
        passed = loss_diff <= tolerance and param_diff <= tolerance
        metrics[f"{mode}_vs_torch"] = {"max_loss_diff": loss_diff, "final_param_diff": param_diff,
                                       "tolerance": tolerance, "passed": passed}
        logger.info("%s vs torch: largest per-epoch loss difference %.3e, final parameter "
                    "difference %.3e (tolerance %g).", mode, loss_diff, param_diff, tolerance)
        if not passed:
            failures.append(f"{mode} vs torch: loss {loss_diff:.3e}, parameters {param_diff:.3e} "
                            f"> {tolerance_key} = {tolerance:g}")
    metrics["final"] = {mode: {"train_loss": result.final_train_loss,
                               "train_accuracy": result.final_train_accuracy,
                               "val_accuracy": result.final_val_accuracy,
                               "train_seconds": result.train_seconds}
                        for mode, result in results.items()}
    if failures:
        raise VerificationError("The modes disagree beyond tolerance: " + "; ".join(failures)
                                + ". No outputs were written.")

    write_json(METRICS, metrics)
    write_csv(PLOT_DATA, rows)
    figures.compare_curves({mode: result.history for mode, result in results.items()}, rows, FIGURE)


if __name__ == "__main__":
    run_stage(main)
