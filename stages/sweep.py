"""Stage sweep: train the experiment's MLP for one configuration of sweep.configs.

DVC runs it once per configuration (sweep@config0, sweep@config1, ...) and passes the
configuration's keys as options, for example
``python -m stages.sweep --name wd0_m0.9 --weight_decay 0.0 --momentum 0.9``.
"""

import argparse
import logging
import math
from pathlib import Path

import torch

from cifar2.data import load_splits
from cifar2.outputs import remove_outputs, staged_directory, write_csv, write_json
from cifar2.params import validate_sweep_config, load_params
from cifar2.stage import resolve_device, resolve_dtype, run_stage
from cifar2.training import OptimizerConfig, build_model, evaluate, train

PARAMS = (
    "base.seed",
    "base.dtype",
    "base.device",
    "model.hidden_sizes",
    "model.activation",
    "train.lr",
    "train.epochs",
    "train.batch_size",
    "train.shuffle",
    "train.mode",
)
EXTRACTED = Path("data/cifar2.npz")
SPLIT = Path("data/split.npz")
RESULTS = Path("results/sweep")

logger = logging.getLogger("stages.sweep")


def parse_config() -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True, help="configuration name, also its folder name")
    parser.add_argument("--weight_decay", required=True, help="L2 weight decay, >= 0")
    parser.add_argument("--momentum", required=True, help="momentum, 0 <= momentum < 1")
    parser.add_argument("--lr", help="learning rate, > 0; defaults to train.lr")
    parser.add_argument("--dampening", default=0.0, help="momentum dampening, default 0")
    parser.add_argument("--nesterov", action="store_true", help="use Nesterov momentum")
    arguments = {key: value for key, value in vars(parser.parse_args()).items() if value is not None}
    return validate_sweep_config(arguments, key=f"sweep configuration {arguments['name']!r}")


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN, so missing scores (of a diverged run) are written as null."""
    return value if math.isfinite(value) else None


def main() -> None:
    params = load_params(PARAMS)
    config = parse_config()
    output = RESULTS / config["name"]
    remove_outputs([output])
    lr = config.get("lr", params["train.lr"])
    optimizer = OptimizerConfig(lr=lr, momentum=config["momentum"], weight_decay=config["weight_decay"],
                                dampening=config["dampening"], nesterov=config["nesterov"])
    dtype, device = resolve_dtype(params["base.dtype"]), resolve_device(params["base.device"])
    splits = load_splits(EXTRACTED, SPLIT, dtype, device)

    model = build_model(params["model.hidden_sizes"], params["model.activation"],
                        len(splits.class_names), params["base.seed"], dtype, device)
    logger.info("Training %s with %s in mode %s for %d epochs.", config["name"], optimizer,
                params["train.mode"], params["train.epochs"])
    result = train(model, params["train.mode"], optimizer, splits.train_x, splits.train_y,
                   splits.val_x, splits.val_y, params["train.epochs"], params["train.batch_size"],
                   params["train.shuffle"], params["base.seed"], description=config["name"])

    predicted = evaluate(model, splits.val_x, splits.val_y)[2] if not result.diverged else None
    # Share of validation predictions that go to the most predicted class: 1.0 means the model
    # collapsed to a single class.
    majority_share = (float(torch.bincount(predicted).max()) / len(predicted)
                      if predicted is not None else None)

    with staged_directory(output) as staging:
        torch.save(model.state_dict(), staging / "model.pt")
        write_csv(staging / "history.csv", result.history,
                  ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy"])
        write_json(staging / "metrics.json", {
            "name": config["name"],
            "lr": lr,
            "weight_decay": config["weight_decay"],
            "momentum": config["momentum"],
            "dampening": config["dampening"],
            "nesterov": config["nesterov"],
            "mode": params["train.mode"],
            "epochs": len(result.history),
            "diverged": result.diverged,
            "diverged_epoch": result.diverged_epoch,
            "train_loss": finite_or_none(result.final_train_loss),
            "train_accuracy": finite_or_none(result.final_train_accuracy),
            "val_loss": finite_or_none(result.final_val_loss),
            "val_accuracy": finite_or_none(result.final_val_accuracy),
            "val_majority_share": majority_share,
            "train_seconds": result.train_seconds,
        })
    logger.info("Wrote %s.", output)


if __name__ == "__main__":
    run_stage(main)
