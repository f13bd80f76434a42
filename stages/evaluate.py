"""Stage evaluate: select the best sweep configuration and evaluate it once on the test set."""

import csv
import logging
from pathlib import Path

import numpy as np
import torch

from cifar2 import figures
from cifar2.data import load_splits
from cifar2.errors import Cifar2Error
from cifar2.evaluation import classification_scores, confusion_records, select_best
from cifar2.network import experiment_mlp
from cifar2.outputs import read_json, remove_outputs, write_csv, write_json
from cifar2.params import load_params
from cifar2.stage import resolve_device, resolve_dtype, run_stage
from cifar2.training import evaluate

PARAMS = (
    "base.dtype",
    "base.device",
    "model.hidden_sizes",
    "model.activation",
    "sweep.configs",
    "evaluate.misclassified_per_direction",
    "evaluate.examples_per_class",
)
EXTRACTED = Path("data/cifar2.npz")
SPLIT = Path("data/split.npz")
RESULTS = Path("results/sweep")
METRICS = Path("metrics/evaluate.json")
SWEEP_METRICS = Path("metrics/sweep.json")
SWEEP_TABLE = Path("plots/sweep.csv")
LEARNING_CURVES = Path("plots/learning_curves.csv")
LEARNING_CURVES_FIGURE = Path("plots/learning_curves.png")
CONFUSION = Path("plots/confusion.json")
CONFUSION_FIGURE = Path("plots/confusion.png")
MISCLASSIFIED_FIGURE = Path("plots/misclassified.png")
EXAMPLES_FIGURE = Path("plots/examples.png")
OUTPUTS = (METRICS, SWEEP_METRICS, SWEEP_TABLE, LEARNING_CURVES, LEARNING_CURVES_FIGURE, CONFUSION,
           CONFUSION_FIGURE, MISCLASSIFIED_FIGURE, EXAMPLES_FIGURE)
SWEEP_COLUMNS = ("name", "lr", "weight_decay", "momentum", "dampening", "nesterov", "mode", "epochs",
                 "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_majority_share",
                 "diverged")

logger = logging.getLogger("stages.evaluate")


def read_sweep(names: list[str]) -> tuple[list[dict], dict[str, list[dict]]]:
    """Final metrics and per-epoch history of every configuration, in sweep order."""
    stale = sorted(path.name for path in RESULTS.iterdir() if path.is_dir() and path.name not in names) \
        if RESULTS.is_dir() else []
    if stale:
        logger.warning("Ignoring %s in %s: not in sweep.configs. Delete them, because they still count "
                       "in this stage's dependency %s.", ", ".join(stale), RESULTS, RESULTS)
    results, histories = [], {}
    for name in names:
        folder = RESULTS / name
        if not (folder / "metrics.json").is_file():
            raise Cifar2Error(f"Sweep results for {name!r} not found in {folder}. "
                              "Run `dvc repro` so that every sweep stage runs first.")
        results.append(read_json(folder / "metrics.json"))
        with open(folder / "history.csv", newline="") as handle:
            histories[name] = [{key: float(value) for key, value in row.items()}
                               for row in csv.DictReader(handle)]
    return results, histories


def denormalize(x: torch.Tensor, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Undo the normalisation for display: ``x * std + mean``, values in [0, 1]."""
    images = x.detach().cpu().double().numpy()
    return images * std.reshape(1, -1, 1, 1) + mean.reshape(1, -1, 1, 1)


def main() -> None:
    params = load_params(PARAMS)
    remove_outputs(OUTPUTS)
    names = [config["name"] for config in params["sweep.configs"]]
    results, histories = read_sweep(names)
    best = select_best(results)
    logger.info("Selected %s: validation accuracy %.4f (lr %g, weight decay %g, momentum %g).",
                best["name"], best["val_accuracy"], best["lr"], best["weight_decay"], best["momentum"])

    dtype, device = resolve_dtype(params["base.dtype"]), resolve_device(params["base.device"])
    splits = load_splits(EXTRACTED, SPLIT, dtype, device)
    class_names = splits.class_names
    model = experiment_mlp(params["model.hidden_sizes"], params["model.activation"],
                           len(class_names), dtype=dtype, device=device)
    model.load_state_dict(torch.load(RESULTS / best["name"] / "model.pt", map_location=device))
    test_loss, _, predicted = evaluate(model, splits.test_x, splits.test_y)
    y_true, y_pred = splits.test_y.cpu().numpy(), predicted.cpu().numpy()
    scores = classification_scores(y_true, y_pred, class_names)
    logger.info("Test accuracy of %s: %.4f on %d images.", best["name"], scores["accuracy"],
                scores["n_samples"])

    selected = {key: best[key] for key in ("name", "lr", "weight_decay", "momentum", "dampening",
                                           "nesterov", "train_accuracy", "val_accuracy")}
    write_json(METRICS, {
        "selected": selected,
        "test": {
            "accuracy": scores["accuracy"],
            "loss": test_loss,
            "n_samples": scores["n_samples"],
            "precision": {name: s["precision"] for name, s in scores["per_class"].items()},
            "recall": {name: s["recall"] for name, s in scores["per_class"].items()},
        },
        "confusion_matrix": {"labels": class_names, "rows_true_columns_predicted":
                             scores["confusion_matrix"]},
    })
    write_json(SWEEP_METRICS, {result["name"]: {key: result[key] for key in
                                                ("train_loss", "train_accuracy", "val_accuracy",
                                                 "diverged")}
                               for result in results})
    write_csv(SWEEP_TABLE, results, SWEEP_COLUMNS)
    write_csv(LEARNING_CURVES, [{"config": name, **row} for name, history in histories.items()
                                for row in history],
              ["config", "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy"])
    write_json(CONFUSION, confusion_records(y_true, y_pred, class_names))

    figures.learning_curves(histories, LEARNING_CURVES_FIGURE, selected=best["name"])
    figures.confusion_matrix(scores["confusion_matrix"], class_names, CONFUSION_FIGURE,
                             title=f"Test confusion matrix of {best['name']}")

    test_images = denormalize(splits.test_x, splits.mean, splits.std)
    shown, captions = [], []
    for true in range(len(class_names)):
        for guess in range(len(class_names)):
            if true == guess:
                continue
            wrong = np.flatnonzero((y_true == true) & (y_pred == guess))
            wrong = wrong[:params["evaluate.misclassified_per_direction"]]
            shown.extend(test_images[wrong])
            captions.extend(f"#{i} true {class_names[true]}\npredicted {class_names[guess]}"
                            for i in wrong)
    figures.image_grid(np.array(shown), captions, MISCLASSIFIED_FIGURE,
                       f"Misclassified test images ({best['name']})")

    train_labels = splits.train_y.cpu().numpy()
    shown, captions = [], []
    for k, name in enumerate(class_names):
        chosen = np.flatnonzero(train_labels == k)[:params["evaluate.examples_per_class"]]
        shown.extend(denormalize(splits.train_x[torch.from_numpy(chosen)], splits.mean, splits.std))
        captions.extend([name] * len(chosen))
    figures.image_grid(np.array(shown), captions, EXAMPLES_FIGURE, "Training images per class",
                       columns=params["evaluate.examples_per_class"])


if __name__ == "__main__":
    run_stage(main)
