"""Train/validation split, normalisation statistics and the float tensors the models train on."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cifar2.errors import ArchiveError
from cifar2.outputs import load_npz

logger = logging.getLogger(__name__)


def split_indices(labels: np.ndarray, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into train and validation, stratified by class.

    Each class gives ``round(validation_fraction * n_class)`` random samples to validation, drawn
    with ``numpy.random.default_rng(seed)``, so the split is the same on every machine. Both index
    arrays are sorted, which keeps the official image order inside each split.
    """
    rng = np.random.default_rng(seed)
    validation = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = int(round(validation_fraction * members.size))
        validation.append(rng.permutation(members)[:count])
    validation_index = np.sort(np.concatenate(validation))
    train_index = np.setdiff1d(np.arange(labels.size), validation_index)
    return train_index, validation_index


def channel_statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std of ``uint8`` images ``(N, 3, H, W)`` scaled to [0, 1]."""
    pixels = images.transpose(1, 0, 2, 3).reshape(images.shape[1], -1).astype(np.float64) / 255.0
    return pixels.mean(axis=1), pixels.std(axis=1)


def load_extracted(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise ArchiveError(f"Extracted data {path} not found. Run `dvc repro download` first.")
    return load_npz(path)


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray, dtype: torch.dtype,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Turn ``uint8`` images ``(N, 3, 32, 32)`` into ``(x / 255 - mean) / std`` per channel."""
    tensor = torch.from_numpy(images).to(device=device, dtype=dtype).div_(255.0)
    mean_t = torch.as_tensor(mean, dtype=dtype, device=device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=dtype, device=device).view(1, -1, 1, 1)
    return tensor.sub_(mean_t).div_(std_t)


@dataclass
class Splits:
    """Normalised tensors of the three splits, built once per stage in the configured dtype."""

    class_names: list[str]
    mean: np.ndarray
    std: np.ndarray
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    train_images: np.ndarray
    test_images: np.ndarray


def load_splits(extracted_path: str | Path, split_path: str | Path, dtype: torch.dtype,
                device: torch.device | str = "cpu") -> Splits:
    """Load the extracted images and the split file, and normalise every split with train statistics."""
    extracted = load_extracted(extracted_path)
    split_path = Path(split_path)
    if not split_path.is_file():
        raise ArchiveError(f"Split file {split_path} not found. Run `dvc repro normalize` first.")
    split = load_npz(split_path)
    mean, std = split["mean"], split["std"]
    images, labels = extracted["train_images"], extracted["train_labels"]

    def tensors(index_images: np.ndarray, index_labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = normalize(index_images, mean, std, dtype, device)
        y = torch.from_numpy(index_labels).to(device=device, dtype=torch.int64)
        return x, y

    train_x, train_y = tensors(images[split["train_index"]], labels[split["train_index"]])
    val_x, val_y = tensors(images[split["validation_index"]], labels[split["validation_index"]])
    test_x, test_y = tensors(extracted["test_images"], extracted["test_labels"])
    logger.info("Loaded %d train, %d validation and %d test images as %s on %s.", len(train_y),
                len(val_y), len(test_y), dtype, device)
    return Splits(
        class_names=[str(name) for name in extracted["class_names"]],
        mean=mean, std=std,
        train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y, test_x=test_x, test_y=test_y,
        train_images=images[split["train_index"]], test_images=extracted["test_images"],
    )
