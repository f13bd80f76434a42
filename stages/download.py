"""Stage download: obtain the CIFAR-10 archive and extract the classes in data.classes."""

import logging
from pathlib import Path

from cifar2.archive import extract_classes, locate_archive
from cifar2.outputs import remove_outputs
from cifar2.params import load_params
from cifar2.stage import run_stage

PARAMS = ("data.url", "data.md5", "data.classes")
DOWNLOAD_DIR = Path("data/downloads")
OUTPUT = Path("data/cifar2.npz")

logger = logging.getLogger("stages.download")


def main() -> None:
    params = load_params(PARAMS)
    remove_outputs([OUTPUT])
    archive = locate_archive(params["data.url"], params["data.md5"], DOWNLOAD_DIR)
    logger.info("Extracting %s from %s.", ", ".join(params["data.classes"]), archive)
    extract_classes(archive, params["data.classes"], OUTPUT)


if __name__ == "__main__":
    run_stage(main)
