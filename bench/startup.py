"""Benchmark the start-up cost of a stage process: wall time and peak RSS of its imports.

Every DVC stage is a new Python process that imports PyTorch before it does any work, so this cost
repeats once per stage, and every sweep configuration is a stage of its own. The script
times ``import torch`` and ``import stages.sweep`` (which imports everything the sweep stage
needs) in fresh processes. Give several interpreters with ``--python``, for example one from a
virtual environment with a CPU-only PyTorch wheel, to compare builds. Their runs alternate, so
load from other processes hits every interpreter.

Run from the repository root:

    python -m bench.startup [--python PATH ...] [--repeats 10]

The wall time of a process includes a small launcher process that reads its peak RSS.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import REPO_ROOT, Timing, format_table, load_average, machine_summary, setup_logging
from bench.pipeline import MIB, measure_process

logger = logging.getLogger("bench.startup")

IMPORTS = ("import torch", "import stages.sweep")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", action="append", dest="interpreters",
                        help="Python interpreter to measure; repeat the option to compare several "
                             "(default: the interpreter running this script)")
    parser.add_argument("--repeats", type=int, default=10,
                        help="processes per interpreter and import statement (default 10)")
    arguments = parser.parse_args()
    if arguments.repeats < 2:
        parser.error(f"--repeats must be >= 2, got {arguments.repeats}.")
    arguments.interpreters = arguments.interpreters or [sys.executable]
    for interpreter in arguments.interpreters:
        if not os.access(interpreter, os.X_OK):
            parser.error(f"--python {interpreter} is not an executable file.")
    return arguments


def torch_version(interpreter: str, environment: dict[str, str]) -> str:
    result = subprocess.run([interpreter, "-c", "import torch; print(torch.__version__, torch.__file__)"],
                            cwd=REPO_ROOT, env=environment, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{interpreter} failed to import torch: {result.stderr.strip()}")
    return result.stdout.strip()


def main() -> None:
    arguments = parse_arguments()
    setup_logging()
    environment = dict(os.environ)
    # Importing from the repository must not write __pycache__ folders into it.
    environment["PYTHONDONTWRITEBYTECODE"] = "1"
    versions = {interpreter: torch_version(interpreter, environment) for interpreter in arguments.interpreters}
    load_before = load_average()

    seconds = {(interpreter, statement): [] for interpreter in arguments.interpreters for statement in IMPORTS}
    peaks = {key: [] for key in seconds}
    with tempfile.TemporaryDirectory(prefix="cifar2-bench-startup-") as scratch:
        for repeat in range(arguments.repeats):
            for key in seconds:
                interpreter, statement = key
                measured = measure_process(statement, [interpreter, "-c", statement], REPO_ROOT,
                                           environment, Path(scratch) / "process.log")
                seconds[key].append(measured.seconds)
                peaks[key].append(measured.max_rss)
            logger.info("%d of %d repeats done.", repeat + 1, arguments.repeats)

    print()
    print(format_table(["setting", "value"], machine_summary()[:-1] + [
        ("load average before / after", f"{load_before} / {load_average()}"),
    ]))
    print()
    rows = []
    for (interpreter, statement), values in seconds.items():
        timing = Timing.of(values)
        rows.append((interpreter, versions[interpreter].split()[0], statement,
                     f"{timing.median:.2f} s", f"{timing.q1:.2f}-{timing.q3:.2f} s",
                     f"{max(peaks[(interpreter, statement)]) / MIB:.0f}"))
    print(format_table(["interpreter", "torch", "statement", "median wall time (process)",
                        "quartiles", "peak RSS MiB (max)"], rows))


if __name__ == "__main__":
    main()
