"""Stage check_params: validate every key of params.yaml.

It depends on the whole file, so any edit, including a misspelled key that no other stage
declares, runs it and fails `dvc repro` with a message naming the key. Every other stage depends
on its output, the list of checked keys, so `dvc repro <stage>` validates params.yaml before DVC
removes that stage's previous outputs. The list changes only when the set of keys changes, so a
new value does not make the other stages run by itself.
"""

import logging
from pathlib import Path

from cifar2.outputs import write_text
from cifar2.params import SCHEMA, load_params
from cifar2.stage import run_stage

PARAMS = tuple(SCHEMA)
CHECKED_KEYS = Path("data/checked_keys.txt")

logger = logging.getLogger("stages.check_params")


def main() -> None:
    params = load_params(PARAMS)
    write_text(CHECKED_KEYS, "".join(f"{key}\n" for key in sorted(params)))
    logger.info("params.yaml is valid: %d keys checked.", len(params))


if __name__ == "__main__":
    run_stage(main)
