"""Stage gradcheck: verify manual backpropagation against autograd and finite differences.

Runs in float64 regardless of base.dtype, because the tolerances are float64 targets. Pass
--debug to log every layer's tensor shapes during the backward passes.
"""

import argparse
import logging
import math
from pathlib import Path

import torch

from cifar2 import figures
from cifar2.data import load_splits
from cifar2.errors import VerificationError
from cifar2.gradcheck import check_gradients
from cifar2.losses import CrossEntropy, SumSquaredError
from cifar2.network import MLP, experiment_mlp
from cifar2.outputs import remove_outputs, write_csv, write_json
from cifar2.params import load_params
from cifar2.stage import run_stage

PARAMS = (
    "base.seed",
    "model.hidden_sizes",
    "model.activation",
    "gradcheck.batch_size",
    "gradcheck.fd_step",
    "gradcheck.fd_entries",
    "gradcheck.tol_autograd",
    "gradcheck.tol_finite_diff",
)
EXTRACTED = Path("data/cifar2.npz")
SPLIT = Path("data/split.npz")
METRICS = Path("metrics/gradcheck.json")
PLOT_DATA = Path("plots/gradcheck.csv")
FIGURE = Path("plots/gradcheck.png")
DTYPE = torch.float64

logger = logging.getLogger("stages.gradcheck")


def log10_error(error: float) -> float:
    """log10 of a relative error for the DVC bar plot; an exact match (0) is drawn at -18."""
    return math.log10(max(error, 1e-18))


def synthetic_case(sizes, activations, loss, batch_size: int, seed: int):
    """Build a seeded network with random inputs and targets: reals for SSE, class ids for cross-entropy."""
    torch.manual_seed(seed)
    model = MLP(sizes, activations, dtype=DTYPE)
    x = torch.randn(batch_size, sizes[0], dtype=DTYPE)
    if isinstance(loss, SumSquaredError):
        y = torch.randn(batch_size, sizes[-1], dtype=DTYPE)
    else:
        y = torch.randint(0, sizes[-1], (batch_size,))
    return model, x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--debug", action="store_true", help="log tensor shapes in backward passes")
    debug = parser.parse_args().debug

    params = load_params(PARAMS)
    remove_outputs([METRICS, PLOT_DATA, FIGURE])
    seed, batch = params["base.seed"], params["gradcheck.batch_size"]
    sse, cross_entropy = SumSquaredError(), CrossEntropy()

    splits = load_splits(EXTRACTED, SPLIT, DTYPE)
    torch.manual_seed(seed)
    cifar_model = experiment_mlp(params["model.hidden_sizes"], params["model.activation"],
                                 len(splits.class_names), dtype=DTYPE)
    cases = [
        ("tiny_tanh_sse", "2-3-2, tanh, sum of squared errors",
         *synthetic_case([2, 3, 2], ["tanh", "tanh"], sse, batch, seed), sse),
        ("mnist_size_tanh_sse", "576-16-10, tanh, sum of squared errors",
         *synthetic_case([576, 16, 10], ["tanh", "tanh"], sse, batch, seed), sse),
        ("deep_mixed_ce", "20-16-12-10-8-3, relu/tanh/sigmoid/relu/identity, cross-entropy",
         *synthetic_case([20, 16, 12, 10, 8, 3], ["relu", "tanh", "sigmoid", "relu", "identity"],
                         cross_entropy, batch, seed), cross_entropy),
        ("experiment_mlp_cifar2", "experiment MLP "
         + "-".join(map(str, cifar_model.sizes)) + f", {params['model.activation']}, cross-entropy, "
         f"first {batch} CIFAR-2 training images",
         cifar_model, splits.train_x[:batch], splits.train_y[:batch], cross_entropy),
    ]

    tolerances = {"autograd": params["gradcheck.tol_autograd"],
                  "finite_diff": params["gradcheck.tol_finite_diff"]}
    results, rows, failures = {}, [], []
    for name, description, model, x, y, loss in cases:
        logger.info("Checking %s (%s).", name, description)
        if debug:
            from cifar2.backprop import backward
            with torch.no_grad():
                backward(model, loss.gradient(model(x), y), store_grad=False, debug=True)
        case = check_gradients(model, loss, x, y, params["gradcheck.fd_step"],
                               params["gradcheck.fd_entries"], seed, name, description)
        layers = {}
        for layer in case.layers:
            passed = (layer.error_autograd <= tolerances["autograd"]
                      and layer.error_finite_diff <= tolerances["finite_diff"]
                      and layer.entries_checked > 0)
            layers[f"layer{layer.layer}"] = {
                "error_autograd": layer.error_autograd,
                "error_finite_diff": layer.error_finite_diff,
                "entries_checked": layer.entries_checked,
                "skipped_at_kink": layer.skipped_at_kink,
                "passed": passed,
            }
            rows.append({"check": f"{name} layer {layer.layer}", "case": name, "layer": layer.layer,
                         "error_autograd": layer.error_autograd,
                         "error_finite_diff": layer.error_finite_diff,
                         "log10_error_autograd": log10_error(layer.error_autograd),
                         "log10_error_finite_diff": log10_error(layer.error_finite_diff),
                         "entries_checked": layer.entries_checked,
                         "skipped_at_kink": layer.skipped_at_kink,
                         "passed": passed})
            if not passed:
                failures.append(f"{name} layer {layer.layer}: {layer.error_autograd:.3e} vs autograd, "
                                f"{layer.error_finite_diff:.3e} vs finite differences, "
                                f"{layer.entries_checked} entries checked")
        # Per-layer numbers go to the plot data only, so `dvc metrics show` stays readable.
        results[name] = {
            "description": description,
            "max_error_autograd": case.max_error_autograd,
            "max_error_finite_diff": case.max_error_finite_diff,
            "passed": all(layer["passed"] for layer in layers.values()),
        }

    if failures:
        raise VerificationError(
            "Manual gradients exceed the tolerances (autograd "
            f"{tolerances['autograd']:g}, finite differences {tolerances['finite_diff']:g}) in: "
            + "; ".join(failures) + ". No outputs were written. Fix cifar2/backprop.py, or raise "
            "gradcheck.tol_* in params.yaml only if the error is rounding, not a bug.")

    write_json(METRICS, {
        "passed": True,
        "max_error_autograd": max(case["max_error_autograd"] for case in results.values()),
        "max_error_finite_diff": max(case["max_error_finite_diff"] for case in results.values()),
        "tolerance": tolerances,
        "fd_step": params["gradcheck.fd_step"],
        "cases": results,
    })
    write_csv(PLOT_DATA, rows)
    figures.gradcheck_errors(rows, FIGURE, tolerances)
    logger.info("All %d cases passed; the largest errors are %.2e against autograd and %.2e "
                "against finite differences.", len(cases),
                max(row["error_autograd"] for row in rows), max(row["error_finite_diff"] for row in rows))


if __name__ == "__main__":
    run_stage(main)
