"""Shared start-up for the stage scripts: logging, error reporting and the compute device."""

from __future__ import annotations

import logging
import sys
from typing import Callable

import torch

from cifar2.errors import Cifar2Error

logger = logging.getLogger(__name__)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main``; on a ``Cifar2Error`` log its message and exit with status 1."""
    setup_logging()
    try:
        main()
    except Cifar2Error as error:
        logging.getLogger("cifar2").error("%s", error)
        sys.exit(1)


def resolve_device(request: str) -> torch.device:
    """Map the ``base.device`` parameter (auto, cpu, cuda) to a device, and log the choice."""
    cuda_available = torch.cuda.is_available()
    if request == "cuda" and not cuda_available:
        raise Cifar2Error("base.device = 'cuda' but no CUDA GPU is available. "
                          "Set base.device to auto or cpu.")
    device = torch.device("cuda" if request != "cpu" and cuda_available else "cpu")
    logger.info("Using device %s (base.device = %s, CUDA available: %s).", device, request,
                cuda_available)
    return device


def resolve_dtype(name: str) -> torch.dtype:
    return {"float64": torch.float64, "float32": torch.float32}[name]
