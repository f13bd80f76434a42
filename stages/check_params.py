"""Stage check_params: validate every key of params.yaml.

It depends on the whole file, so any edit, including a misspelled key that no other stage
declares, runs it and fails `dvc repro` with a message naming the key.
"""

import logging

from cifar2.params import SCHEMA, load_params
from cifar2.stage import run_stage

PARAMS = tuple(SCHEMA)

logger = logging.getLogger("stages.check_params")


def main() -> None:
    params = load_params(PARAMS)
    logger.info("params.yaml is valid: %d keys checked.", len(params))


if __name__ == "__main__":
    run_stage(main)
