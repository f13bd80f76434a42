"""Shared fixtures: small archives in the official CIFAR-10 format, and the project's paths."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar2.params import CIFAR10_CLASSES

# The unit tests run thousands of tiny tensor operations; with a thread pool each one waits for
# the other core, which makes the suite several times slower on a busy 2-core machine.
torch.set_num_threads(1)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The real airplane/bird mirror of CIFAR-10; tests that need it skip when it is absent.
REAL_ARCHIVE = Path(os.environ.get(
    "CIFAR10_ARCHIVE",
    PROJECT_ROOT.parent / "shared" / "data" / "cifar2" / "cifar-10-airplane-bird-python.tar.gz",
))


def make_batches(per_class: int = 3, seed: int = 0, n_train_batches: int = 5,
                 classes: tuple[int, ...] = tuple(range(10))) -> dict[str, dict]:
    """Random batches with ``per_class`` images of each CIFAR-10 label in ``classes`` per batch.

    Labels are interleaved (0, 1, ..., 9, 0, 1, ...) as in the shuffled official batches.
    """
    rng = np.random.default_rng(seed)
    batches = {}
    names = [f"data_batch_{k}" for k in range(1, n_train_batches + 1)] + ["test_batch"]
    for name in names:
        labels = [label for _ in range(per_class) for label in classes]
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        batches[name] = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"{name}_{i}.png".encode() for i in range(len(labels))],
        }
    return batches


def write_archive(path: Path, batches: dict[str, dict], meta: dict | None = None,
                  skip: tuple[str, ...] = ()) -> Path:
    """Write ``batches`` as a ``cifar-10-python.tar.gz`` with pickles like the official ones."""
    if meta is None:
        meta = {b"num_cases_per_batch": 10000, b"label_names": [n.encode() for n in CIFAR10_CLASSES],
                b"num_vis": 3072}
    members = {"batches.meta": meta, **batches}
    with tarfile.open(path, "w:gz") as archive:
        for name, content in members.items():
            if name in skip:
                continue
            payload = pickle.dumps(content, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture
def tiny_batches() -> dict[str, dict]:
    return make_batches()


@pytest.fixture
def tiny_archive(tmp_path: Path, tiny_batches) -> Path:
    return write_archive(tmp_path / "cifar-10-python.tar.gz", tiny_batches)


@pytest.fixture
def real_archive() -> Path:
    if not REAL_ARCHIVE.is_file():
        pytest.skip(f"real CIFAR-10 archive not found at {REAL_ARCHIVE}; set CIFAR10_ARCHIVE")
    return REAL_ARCHIVE


def copy_project(destination: Path, names: tuple[str, ...] = ("cifar2", "stages", "params.yaml")) -> Path:
    """Copy parts of the project, so that stages can run in ``destination`` as from the root."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in names:
        source = PROJECT_ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, destination / name)
    return destination


def run_stage(project: Path, module: str, archive: Path) -> subprocess.CompletedProcess:
    """Run ``python -m module`` in ``project`` with ``CIFAR10_ARCHIVE`` naming ``archive``."""
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    environment["CIFAR10_ARCHIVE"] = str(archive)
    return subprocess.run([sys.executable, "-m", module], cwd=project, env=environment,
                          capture_output=True, text=True, timeout=600)
