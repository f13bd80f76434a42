"""Tests of cifar2.data, and of the download and normalize stages on the real airplane/bird archive."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cifar2.data import channel_statistics, load_splits, normalize, split_indices
from cifar2.errors import ArchiveError
from cifar2.outputs import load_npz, save_npz
from conftest import copy_project, run_stage


def shuffled_labels(class_sizes: list[int], seed: int) -> np.ndarray:
    """Return ``class_sizes[k]`` labels of each class ``k`` in random order."""
    labels = np.repeat(np.arange(len(class_sizes)), class_sizes)
    return np.random.default_rng(seed).permutation(labels)


def random_images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, 3, 32, 32), dtype=np.uint8)


# The classes differ in size, so a split that ignores classes or rounds differently fails the tests.
LABELS = shuffled_labels([37, 50, 13, 100], seed=5)


# split_indices


def test_split_same_seed_repeats():
    first = split_indices(LABELS, 0.1, seed=265)
    second = split_indices(LABELS, 0.1, seed=265)

    assert np.array_equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])


def test_split_other_seed_differs():
    _, validation_a = split_indices(LABELS, 0.1, seed=1)
    _, validation_b = split_indices(LABELS, 0.1, seed=2)

    assert not np.array_equal(validation_a, validation_b)


def test_split_disjoint():
    train, validation = split_indices(LABELS, 0.2, seed=0)

    assert np.intersect1d(train, validation).size == 0


def test_split_covers_all_indices():
    train, validation = split_indices(LABELS, 0.2, seed=0)

    assert np.array_equal(np.sort(np.concatenate([train, validation])), np.arange(LABELS.size))


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.9])
def test_split_stratified(fraction):
    _, validation = split_indices(LABELS, fraction, seed=7)

    for label in np.unique(LABELS):
        class_size = int((LABELS == label).sum())
        assert int((LABELS[validation] == label).sum()) == round(fraction * class_size), label


def test_split_sorted():
    train, validation = split_indices(LABELS, 0.3, seed=3)

    assert np.all(np.diff(train) > 0)
    assert np.all(np.diff(validation) > 0)


def test_split_integer_indices():
    train, validation = split_indices(LABELS, 0.3, seed=3)

    assert np.issubdtype(train.dtype, np.integer)
    assert np.issubdtype(validation.dtype, np.integer)


def test_split_sparse_label_values():
    # The labels are CIFAR-10 ids (airplane 0, bird 2), not remapped to 0..k-1.
    labels = np.where(shuffled_labels([20, 30], seed=1) == 0, 0, 2)

    _, validation = split_indices(labels, 0.1, seed=0)

    assert int((labels[validation] == 0).sum()) == 2
    assert int((labels[validation] == 2).sum()) == 3


# channel_statistics and normalize


def test_statistics_match_torch():
    images = random_images(20, seed=11)

    mean, std = channel_statistics(images)

    pixels = torch.from_numpy(images).to(torch.float64) / 255.0
    for channel in range(3):
        values = pixels[:, channel]
        assert mean[channel] == pytest.approx(values.mean().item(), rel=1e-12)
        assert std[channel] == pytest.approx(values.std(correction=0).item(), rel=1e-12)


def test_statistics_population_std():
    # After scaling, half the pixels are 0 and half are 1, so the population std is 0.5. The sample
    # std (divisor N - 1) would be larger.
    images = np.zeros((2, 3, 32, 32), dtype=np.uint8)
    images[1] = 255

    mean, std = channel_statistics(images)

    assert mean.tolist() == pytest.approx([0.5, 0.5, 0.5], rel=1e-12)
    assert std.tolist() == pytest.approx([0.5, 0.5, 0.5], rel=1e-12)


def test_statistics_per_channel():
    images = np.zeros((4, 3, 32, 32), dtype=np.uint8)
    images[:, 1] = 51
    images[:, 2] = 255

    mean, std = channel_statistics(images)

    assert mean.tolist() == pytest.approx([0.0, 0.2, 1.0], rel=1e-12)
    assert std.tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)


def test_normalize_zero_mean_unit_std():
    images = random_images(50, seed=12)
    mean, std = channel_statistics(images)

    tensor = normalize(images, mean, std, torch.float64)

    for channel in range(3):
        values = tensor[:, channel]
        assert abs(values.mean().item()) < 1e-12
        assert values.std(correction=0).item() == pytest.approx(1.0, abs=1e-12)


def test_normalize_formula():
    images = random_images(5, seed=13)
    mean = np.array([0.3, 0.5, 0.7])
    std = np.array([0.2, 0.25, 0.1])

    tensor = normalize(images, mean, std, torch.float64)

    expected = (images / 255.0 - mean[None, :, None, None]) / std[None, :, None, None]
    assert np.allclose(tensor.numpy(), expected, rtol=0, atol=1e-12)


def test_normalize_float32():
    images = random_images(50, seed=14)
    mean, std = channel_statistics(images)

    tensor = normalize(images, mean, std, torch.float32)

    assert tensor.dtype == torch.float32
    assert tensor.shape == (50, 3, 32, 32)
    assert abs(tensor[:, 0].mean().item()) < 1e-5


def test_normalize_keeps_source():
    images = random_images(5, seed=15)
    original = images.copy()
    mean, std = channel_statistics(images)

    normalize(images, mean, std, torch.float64)

    assert np.array_equal(images, original)


# load_splits


def write_extracted(folder: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """Write a small cifar2.npz and split.npz as the download and normalize stages would."""
    train_labels = shuffled_labels([30, 30], seed=21)
    extracted = {
        "train_images": random_images(60, seed=22),
        "train_labels": train_labels,
        "test_images": random_images(10, seed=23),
        "test_labels": shuffled_labels([5, 5], seed=24),
        "class_names": np.array(["airplane", "bird"]),
    }
    train_index, validation_index = split_indices(train_labels, 0.2, seed=0)
    mean, std = channel_statistics(extracted["train_images"][train_index])
    extracted_path, split_path = folder / "cifar2.npz", folder / "split.npz"
    save_npz(extracted_path, extracted)
    save_npz(split_path, {"train_index": train_index, "validation_index": validation_index,
                          "mean": mean, "std": std})
    return extracted_path, split_path, extracted


def test_load_splits_sizes(tmp_path):
    extracted_path, split_path, _ = write_extracted(tmp_path)

    splits = load_splits(extracted_path, split_path, torch.float64)

    assert splits.train_x.shape == (48, 3, 32, 32)
    assert splits.val_x.shape == (12, 3, 32, 32)
    assert splits.test_x.shape == (10, 3, 32, 32)
    assert splits.class_names == ["airplane", "bird"]


def test_load_splits_train_statistics(tmp_path):
    extracted_path, split_path, extracted = write_extracted(tmp_path)
    split = load_npz(split_path)

    splits = load_splits(extracted_path, split_path, torch.float64)

    validation_images = extracted["train_images"][split["validation_index"]]
    expected_validation = normalize(validation_images, split["mean"], split["std"], torch.float64)
    expected_test = normalize(extracted["test_images"], split["mean"], split["std"], torch.float64)
    assert torch.equal(splits.val_x, expected_validation)
    assert torch.equal(splits.test_x, expected_test)
    assert abs(splits.train_x[:, 2].mean().item()) < 1e-12


def test_load_splits_labels(tmp_path):
    extracted_path, split_path, extracted = write_extracted(tmp_path)
    split = load_npz(split_path)

    splits = load_splits(extracted_path, split_path, torch.float64)

    assert splits.train_y.dtype == torch.int64
    assert splits.train_y.tolist() == extracted["train_labels"][split["train_index"]].tolist()
    assert splits.val_y.tolist() == extracted["train_labels"][split["validation_index"]].tolist()
    assert splits.test_y.tolist() == extracted["test_labels"].tolist()


def test_load_splits_missing_extracted(tmp_path):
    _, split_path, _ = write_extracted(tmp_path)
    absent = tmp_path / "absent.npz"

    with pytest.raises(ArchiveError, match="not found") as raised:
        load_splits(absent, split_path, torch.float64)

    assert str(absent) in str(raised.value)


def test_load_splits_missing_split(tmp_path):
    extracted_path, _, _ = write_extracted(tmp_path)
    absent = tmp_path / "absent.npz"

    with pytest.raises(ArchiveError, match="not found") as raised:
        load_splits(extracted_path, absent, torch.float64)

    assert str(absent) in str(raised.value)


# Both stages on the real archive


def histogram_statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compute per-channel mean and population std of uint8 images on [0, 1] from pixel counts."""
    levels = np.arange(256) / 255.0
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = np.bincount(images[:, channel].ravel(), minlength=256)
        mean = counts @ levels / counts.sum()
        means.append(mean)
        stds.append(np.sqrt(counts @ (levels - mean) ** 2 / counts.sum()))
    return np.array(means), np.array(stds)


def test_stages_on_real_archive(tmp_path, real_archive):
    project = copy_project(tmp_path / "project")
    # Pin the two values the expected counts depend on, in case params.yaml changes.
    params_file = project / "params.yaml"
    tree = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    tree["data"]["classes"] = ["airplane", "bird"]
    tree["split"]["validation_fraction"] = 0.1
    params_file.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")

    for module in ("stages.download", "stages.normalize"):
        result = run_stage(project, module, real_archive)
        assert result.returncode == 0, f"{module} failed:\n{result.stderr}"

    data = load_npz(project / "data" / "cifar2.npz")
    split = load_npz(project / "data" / "split.npz")
    metrics = json.loads((project / "metrics" / "data.json").read_text(encoding="utf-8"))
    labels = data["train_labels"]
    train_index, validation_index = split["train_index"], split["validation_index"]

    # CIFAR-10 has 5000 training and 1000 test images of each class.
    assert data["train_images"].shape == (10000, 3, 32, 32)
    assert data["test_images"].shape == (2000, 3, 32, 32)
    assert np.bincount(labels).tolist() == [5000, 5000]
    assert np.bincount(data["test_labels"]).tolist() == [1000, 1000]
    assert data["class_names"].tolist() == ["airplane", "bird"]

    assert train_index.size == 9000
    assert validation_index.size == 1000
    assert np.bincount(labels[validation_index]).tolist() == [500, 500]
    assert np.intersect1d(train_index, validation_index).size == 0

    assert metrics["size"] == {"train": int(train_index.size), "validation": int(validation_index.size),
                               "test": int(data["test_labels"].size)}
    for name, index in (("train", train_index), ("validation", validation_index)):
        counts = np.bincount(labels[index], minlength=2)
        assert metrics["class_counts"][name] == {"airplane": int(counts[0]), "bird": int(counts[1])}
    test_counts = np.bincount(data["test_labels"], minlength=2)
    assert metrics["class_counts"]["test"] == {"airplane": int(test_counts[0]), "bird": int(test_counts[1])}
    assert [metrics["mean"][channel] for channel in ("red", "green", "blue")] == split["mean"].tolist()
    assert [metrics["std"][channel] for channel in ("red", "green", "blue")] == split["std"].tolist()

    mean, std = histogram_statistics(data["train_images"][train_index])
    assert np.allclose(split["mean"], mean, rtol=1e-10, atol=0)
    assert np.allclose(split["std"], std, rtol=1e-10, atol=0)
