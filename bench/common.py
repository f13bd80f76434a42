"""Shared parts of the benchmarks: the experiment's settings, the data, timing statistics and tables.

Every benchmark runs on the CPU with the thread count PyTorch chooses (or ``--threads``), reads the
model and optimizer settings from ``params.yaml`` in the repository root, and only reads files
there: nothing in the repository is written.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import psutil
import torch

from cifar2.data import load_splits
from cifar2.params import load_params
from cifar2.stage import resolve_dtype
from cifar2.training import OptimizerConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
EXTRACTED = REPO_ROOT / "data" / "cifar2.npz"
SPLIT = REPO_ROOT / "data" / "split.npz"
PARAMS = (
    "base.seed",
    "base.dtype",
    "model.hidden_sizes",
    "model.activation",
    "train.batch_size",
    "train.shuffle",
    "compare.lr",
    "compare.weight_decay",
    "compare.momentum",
)
# Sizes of the real split (CIFAR-10 airplane and bird, 10% held out), used for random stand-in data.
TRAIN_SAMPLES = 9000
VALIDATION_SAMPLES = 1000
N_CLASSES = 2
DEVICE = torch.device("cpu")

logger = logging.getLogger("bench")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


@dataclass(frozen=True)
class Experiment:
    """The settings of ``params.yaml`` that decide the cost of a training step."""

    seed: int
    dtype: torch.dtype
    hidden_sizes: tuple[int, ...]
    activation: str
    batch_size: int
    shuffle: bool
    optimizer: OptimizerConfig


def load_experiment(momentum: float | None = None, weight_decay: float | None = None) -> Experiment:
    """Read the model, batch size and the compare stage's optimizer settings from ``params.yaml``.

    The compare configuration (momentum and weight decay both on) runs every line of the update,
    so it is the most expensive optimizer setting of the pipeline. ``momentum`` and
    ``weight_decay``, when given, replace the compare stage's values.
    """
    params = load_params(PARAMS, REPO_ROOT / "params.yaml")
    optimizer = OptimizerConfig(
        lr=params["compare.lr"],
        momentum=params["compare.momentum"] if momentum is None else momentum,
        weight_decay=params["compare.weight_decay"] if weight_decay is None else weight_decay)
    return Experiment(seed=params["base.seed"], dtype=resolve_dtype(params["base.dtype"]),
                      hidden_sizes=tuple(params["model.hidden_sizes"]),
                      activation=params["model.activation"], batch_size=params["train.batch_size"],
                      shuffle=params["train.shuffle"], optimizer=optimizer)


@dataclass
class Data:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    source: str


def load_data(dtype: torch.dtype, seed: int) -> Data:
    """Load the normalised real splits if the pipeline has made them, else random data of the same shape."""
    if EXTRACTED.is_file() and SPLIT.is_file():
        splits = load_splits(EXTRACTED, SPLIT, dtype, DEVICE)
        return Data(splits.train_x, splits.train_y, splits.val_x, splits.val_y,
                    source=f"real CIFAR-2 splits from {EXTRACTED.parent}")

    logger.warning("%s or %s not found, so the benchmark uses random data of the same shape.",
                   EXTRACTED, SPLIT)
    generator = torch.Generator().manual_seed(seed)
    shape = (3, 32, 32)
    return Data(
        train_x=torch.randn(TRAIN_SAMPLES, *shape, generator=generator, dtype=dtype),
        train_y=torch.randint(0, N_CLASSES, (TRAIN_SAMPLES,), generator=generator),
        val_x=torch.randn(VALIDATION_SAMPLES, *shape, generator=generator, dtype=dtype),
        val_y=torch.randint(0, N_CLASSES, (VALIDATION_SAMPLES,), generator=generator),
        source="random normal data (data/cifar2.npz or data/split.npz missing)",
    )


def thread_count(text: str) -> int:
    """Parse the ``--threads`` option: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def load_average() -> str:
    """Return the 1, 5 and 15 minute load averages from ``/proc/loadavg``, or ``unknown`` off Linux."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_summary() -> list[tuple[str, str]]:
    """Rows describing the machine and the PyTorch build, printed before the results."""
    return [
        ("CPU", f"{cpu_model()}, {os.cpu_count()} logical cores"),
        ("memory", f"{psutil.virtual_memory().total / 2**30:.1f} GiB"),
        ("torch", f"{torch.__version__}, MKL {'on' if torch.backends.mkl.is_available() else 'off'}, "
                  f"{torch.get_num_threads()} intra-op threads"),
        ("load average", load_average()),
    ]


@dataclass(frozen=True)
class Timing:
    """Median and quartiles of repeated measurements, in seconds."""

    median: float
    q1: float
    q3: float
    count: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Timing":
        if len(samples) < 2:
            raise ValueError(f"Need at least 2 timings for quartiles, got {len(samples)}; "
                             "raise --repeats or --epochs.")
        q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive")
        return cls(median=median, q1=q1, q3=q3, count=len(samples))

    def milliseconds(self) -> str:
        return f"{self.median * 1e3:.2f} ms (IQR {self.q1 * 1e3:.2f}-{self.q3 * 1e3:.2f}, n={self.count})"


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Render rows as a Markdown table with columns padded to equal width."""
    cells = [[str(value) for value in header]] + [[str(value) for value in row] for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    lines = ["| " + " | ".join(value.ljust(width) for value, width in zip(row, widths)) + " |"
             for row in cells]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)
