"""Stage report: write report/report.md and copy its figures beside it."""

import csv
import logging
import shutil
from pathlib import Path

from cifar2 import report
from cifar2.errors import Cifar2Error
from cifar2.outputs import read_json, staged_directory, write_text
from cifar2.params import load_params
from cifar2.stage import run_stage

PARAMS = (
    "base.seed",
    "model.hidden_sizes",
    "model.activation",
    "train.epochs",
    "train.batch_size",
    "train.mode",
)
INPUTS = {
    "data": Path("metrics/data.json"),
    "gradcheck": Path("metrics/gradcheck.json"),
    "compare": Path("metrics/compare.json"),
    "evaluation": Path("metrics/evaluate.json"),
}
SWEEP_TABLE = Path("plots/sweep.csv")
FIGURES = ("examples", "gradcheck", "compare", "learning_curves", "confusion", "misclassified")
OUTPUT = Path("report")

logger = logging.getLogger("stages.report")


def read_sweep_table(path: Path) -> list[dict]:
    """Rows of the sweep table with numbers and booleans typed again; empty cells become None."""
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            typed = {}
            for key, value in row.items():
                if key in ("name", "mode"):
                    typed[key] = value
                elif value in ("true", "false"):
                    typed[key] = value == "true"
                else:
                    typed[key] = float(value) if value != "" else None
            rows.append(typed)
    return rows


def main() -> None:
    params = load_params(PARAMS)
    missing = [str(path) for path in [*INPUTS.values(), SWEEP_TABLE] if not path.is_file()]
    if missing:
        raise Cifar2Error(f"Report inputs not found: {', '.join(missing)}. Run `dvc repro` so the "
                          "earlier stages write them.")
    metrics = {name: read_json(path) for name, path in INPUTS.items()}
    setup = {"seed": params["base.seed"], "hidden_sizes": params["model.hidden_sizes"],
             "activation": params["model.activation"], "epochs": params["train.epochs"],
             "batch_size": params["train.batch_size"], "mode": params["train.mode"]}
    text = report.render(metrics["data"], metrics["gradcheck"], metrics["compare"],
                         read_sweep_table(SWEEP_TABLE), metrics["evaluation"], setup)

    with staged_directory(OUTPUT) as staging:
        (staging / "figures").mkdir()
        for name in FIGURES:
            shutil.copyfile(Path("plots") / f"{name}.png", staging / "figures" / f"{name}.png")
        write_text(staging / "report.md", text)
    logger.info("Wrote %s with %d figures.", OUTPUT / "report.md", len(FIGURES))


if __name__ == "__main__":
    run_stage(main)
