#!/usr/bin/env bash
# Set up .venv, then reproduce the whole pipeline with `dvc repro` (extra arguments go to dvc repro).
# Offline: set CIFAR10_ARCHIVE to a local copy of cifar-10-python.tar.gz first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
dvc repro "$@"
