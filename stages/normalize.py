"""Stage normalize: split the training images and compute per-channel statistics on the train split."""

import logging
from pathlib import Path

import numpy as np

from cifar2.data import channel_statistics, load_extracted, split_indices
from cifar2.errors import ParamsError
from cifar2.outputs import remove_outputs, save_npz, write_json
from cifar2.params import load_params
from cifar2.stage import run_stage

PARAMS = ("base.seed", "split.validation_fraction")
EXTRACTED = Path("data/cifar2.npz")
SPLIT = Path("data/split.npz")
METRICS = Path("metrics/data.json")
CHANNELS = ("red", "green", "blue")

logger = logging.getLogger("stages.normalize")


def class_counts(labels: np.ndarray, class_names: list[str]) -> dict[str, int]:
    return {name: int((labels == k).sum()) for k, name in enumerate(class_names)}


def main() -> None:
    params = load_params(PARAMS)
    remove_outputs([SPLIT, METRICS])
    data = load_extracted(EXTRACTED)
    class_names = [str(name) for name in data["class_names"]]
    labels = data["train_labels"]

    train_index, validation_index = split_indices(labels, params["split.validation_fraction"],
                                                  params["base.seed"])
    train_counts = class_counts(labels[train_index], class_names)
    validation_counts = class_counts(labels[validation_index], class_names)
    if min(train_counts.values()) == 0 or min(validation_counts.values()) == 0:
        raise ParamsError(
            f"split.validation_fraction = {params['split.validation_fraction']} leaves a class "
            f"without images (train {train_counts}, validation {validation_counts}). Choose a "
            "fraction that keeps at least one image of each class on both sides, such as 0.1.")
    mean, std = channel_statistics(data["train_images"][train_index])
    logger.info("Split %d training images into %d train and %d validation (seed %d).", labels.size,
                train_index.size, validation_index.size, params["base.seed"])
    logger.info("Train-split mean %s, std %s (pixels scaled to [0, 1]).", np.round(mean, 4),
                np.round(std, 4))

    save_npz(SPLIT, {"train_index": train_index, "validation_index": validation_index,
                     "mean": mean, "std": std})
    write_json(METRICS, {
        "size": {"train": int(train_index.size), "validation": int(validation_index.size),
                 "test": int(data["test_labels"].size)},
        "class_counts": {
            "train": train_counts,
            "validation": validation_counts,
            "test": class_counts(data["test_labels"], class_names),
        },
        "mean": dict(zip(CHANNELS, map(float, mean))),
        "std": dict(zip(CHANNELS, map(float, std))),
    })


if __name__ == "__main__":
    run_stage(main)
