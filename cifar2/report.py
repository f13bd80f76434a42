"""The experiment report in Markdown, written from the metrics and plot files of one run.

Every number in the report is read from those files and printed with the formats below, so a test
can parse the report and compare it with the metrics.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from cifar2.network import N_INPUTS

# Formats used for every number in the report.
ACCURACY = "{:.4f}"
LOSS = "{:.4f}"
ERROR = "{:.2e}"
STATISTIC = "{:.4f}"
# A configuration whose validation predictions give at least this share to one class is reported
# as collapsed to that class.
COLLAPSE_SHARE = 0.95
GENERALISATION_GAP = 0.05


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _number(value: float | None, style: str) -> str:
    return "n/a" if value is None else style.format(value)


def _data_section(data: Mapping[str, Any]) -> str:
    sizes, counts = data["size"], data["class_counts"]
    class_names = list(counts["train"])
    split_rows = [[split, sizes[split], *(counts[split][name] for name in class_names)]
                  for split in ("train", "validation", "test")]
    channel_rows = [[channel, STATISTIC.format(data["mean"][channel]), STATISTIC.format(data["std"][channel])]
                    for channel in data["mean"]]
    return "\n\n".join([
        "## Data",
        f"CIFAR-10 images of the classes {', '.join(class_names)}, labelled 0 to "
        f"{len(class_names) - 1} in that order. The training images are split into train and "
        "validation, stratified by class; the test set is used once, for the selected model.",
        _table(["split", "images", *class_names], split_rows),
        "Inputs are normalised per channel with the train split's mean and standard deviation "
        "(pixels scaled to [0, 1]):",
        _table(["channel", "mean", "std"], channel_rows),
        "![Training images per class](figures/examples.png)",
    ])


def _gradcheck_section(gradcheck: Mapping[str, Any]) -> str:
    rows = [[name, case["description"], ERROR.format(case["max_error_autograd"]),
             ERROR.format(case["max_error_finite_diff"]), "yes" if case["passed"] else "no"]
            for name, case in gradcheck["cases"].items()]
    tolerance = gradcheck["tolerance"]
    return "\n\n".join([
        "## Gradient verification",
        "The manual backward pass is compared with autograd on every entry and with central "
        "finite differences on sampled entries. The error is the relative error "
        "||g_ref - g|| / (||g_ref|| + ||g||), the largest over the layers of each case, in float64. "
        f"Tolerances: {ERROR.format(tolerance['autograd'])} against autograd, "
        f"{ERROR.format(tolerance['finite_diff'])} against finite differences.",
        _table(["case", "network", "max error vs autograd", "max error vs finite differences", "passed"], rows),
        "![Relative error per layer](figures/gradcheck.png)",
    ])


def _compare_section(compare: Mapping[str, Any], epochs: int) -> str:
    config = compare["config"]
    rows = []
    for mode in ("manual_update", "manual"):
        result = compare[f"{mode}_vs_torch"]
        rows.append([f"{mode} vs torch", str(result["epochs_checked"]),
                     ERROR.format(result["max_loss_diff_checked"]),
                     ERROR.format(result["max_param_diff_checked"]), ERROR.format(result["tolerance"]),
                     "yes" if result["passed"] else "no"])
    steps = compare["manual_backward_vs_autograd"]
    step_row = [["manual backward vs autograd, same weights and batch", str(steps["steps"]),
                 ERROR.format(steps["max_relative_error"]), ERROR.format(steps["tolerance"]),
                 "yes" if steps["passed"] else "no"]]
    final_rows = [[mode, LOSS.format(final["train_loss"]), ACCURACY.format(final["train_accuracy"]),
                   ACCURACY.format(final["val_accuracy"])] for mode, final in compare["final"].items()]
    manual = compare["manual_vs_torch"]
    if manual["separation_epoch"] is None:
        whole_run = (f"Over all {epochs} epochs the manual run stays within the tolerance: largest loss "
                     f"difference {ERROR.format(manual['max_loss_diff'])}, final parameter difference "
                     f"{ERROR.format(manual['final_param_diff'])}.")
    else:
        whole_run = (f"The manual run leaves the tolerance in epoch {manual['separation_epoch']}: over all "
                     f"{epochs} epochs the largest loss difference is {ERROR.format(manual['max_loss_diff'])} "
                     f"and the final parameter difference {ERROR.format(manual['final_param_diff'])}. "
                     "Differences in the last bit of the loss gradient grow during training until one "
                     "switches a ReLU unit, and from then on the two runs follow different trajectories. "
                     "The per-step check shows that the gradients themselves still agree.")
    control = compare.get("torch_perturbed_vs_torch")
    if control is not None:
        if control["separation_epoch"] is None:
            whole_run += (" As a control, `torch` started with one weight moved by one unit in the last "
                          f"place stays within the tolerance of `torch` for all {epochs} epochs "
                          f"(final parameter difference {ERROR.format(control['final_param_diff'])}).")
        else:
            whole_run += (" As a control, `torch` started with one weight moved by one unit in the last "
                          f"place separates from `torch` in epoch {control['separation_epoch']} and ends "
                          f"{ERROR.format(control['final_param_diff'])} apart in the parameters, so a "
                          "last-bit change alone is enough for such a separation.")
    return "\n\n".join([
        "## Manual training against PyTorch",
        f"One configuration (lr {config['lr']:g}, weight decay {config['weight_decay']:g}, momentum "
        f"{config['momentum']:g}) trained for {epochs} epochs in three modes from identical initial "
        "weights: `torch` (autograd and `torch.optim.SGD`), `manual_update` (autograd and the "
        "manual SGD) and `manual` (manual backpropagation and the manual SGD). Differences are "
        "relative: the largest over the checked epochs for the training loss and for the parameter "
        "tensors after each epoch.",
        _table(["comparison", "epochs checked", "max loss difference", "max parameter difference",
                "tolerance", "passed"], rows),
        "The manual backward pass is also compared with autograd at every step of the `torch` run, "
        "on that step's weights and batch, so this check does not drift with the trajectories. The "
        "error is the largest relative error over the parameter tensors and steps.",
        _table(["check", "steps", "max gradient error", "tolerance", "passed"], step_row),
        whole_run,
        _table(["mode", "final training loss", "training accuracy", "validation accuracy"], final_rows),
        "![Training loss of each run, and its parameter difference to torch](figures/compare.png)",
    ])


def _sweep_section(sweep: Sequence[Mapping[str, Any]], selected: Mapping[str, Any]) -> str:
    rows = [[row["name"], f"{row['lr']:g}", f"{row['weight_decay']:g}", f"{row['momentum']:g}",
             _number(row["train_loss"], LOSS), _number(row["train_accuracy"], ACCURACY),
             _number(row["val_accuracy"], ACCURACY), "yes" if row["diverged"] else "no"]
            for row in sweep]
    return "\n\n".join([
        "## Parameter sweep",
        "The final training loss is the mean over the last epoch, while the weights were still "
        "changing; the training accuracy is measured after training, on the whole train split.",
        _table(["configuration", "lr", "weight decay", "momentum", "final training loss",
                "training accuracy", "validation accuracy", "diverged"], rows),
        f"Selected configuration: **{selected['name']}** (lr {selected['lr']:g}, weight decay "
        f"{selected['weight_decay']:g}, momentum {selected['momentum']:g}), the highest validation "
        f"accuracy, {ACCURACY.format(selected['val_accuracy'])}. Ties would go to the lower "
        "validation loss, then to the configuration listed first; diverged runs are excluded.",
        "![Learning curves of the sweep](figures/learning_curves.png)",
    ])


def _test_section(evaluation: Mapping[str, Any]) -> str:
    test = evaluation["test"]
    rows = [[name, ACCURACY.format(test["precision"][name]), ACCURACY.format(test["recall"][name])]
            for name in test["precision"]]
    return "\n\n".join([
        "## Test evaluation",
        f"Test accuracy of {evaluation['selected']['name']}: **{ACCURACY.format(test['accuracy'])}** "
        f"on {test['n_samples']} images.",
        _table(["class", "precision", "recall"], rows),
        "![Test confusion matrix](figures/confusion.png)",
        "![Misclassified test images](figures/misclassified.png)",
    ])


def _answers_section(gradcheck: Mapping[str, Any], compare: Mapping[str, Any],
                     sweep: Sequence[Mapping[str, Any]], evaluation: Mapping[str, Any],
                     n_parameters: int, n_train: int) -> str:
    selected, test = evaluation["selected"], evaluation["test"]
    collapsed = [row for row in sweep if not row["diverged"] and row["val_majority_share"] is not None
                 and row["val_majority_share"] >= COLLAPSE_SHARE]
    diverged = [row["name"] for row in sweep if row["diverged"]]
    gaps = [(row["name"], row["train_accuracy"] - row["val_accuracy"]) for row in sweep
            if not row["diverged"] and row["train_accuracy"] is not None]
    overfit = [f"{name} ({ACCURACY.format(gap)})" for name, gap in gaps if gap > GENERALISATION_GAP]

    comments = []
    if collapsed:
        comments.append(
            "Configurations that collapse to (nearly) one class on validation: "
            + ", ".join(f"{row['name']} ({ACCURACY.format(row['val_majority_share'])} of predictions "
                        f"in one class, validation accuracy {ACCURACY.format(row['val_accuracy'])})"
                        for row in collapsed)
            + ".")
        if any(row["weight_decay"] > 0 for row in collapsed):
            comments.append(
                "Where the weight decay is large, it shrinks the weights faster than the gradient of "
                "the data term can grow them, so the logits no longer depend on the input.")
    else:
        comments.append("No configuration collapsed to a single class.")
    if diverged:
        comments.append(f"Diverged (excluded from selection): {', '.join(diverged)}.")
    if overfit:
        comments.append(
            "Training accuracy exceeds validation accuracy by more than "
            f"{ACCURACY.format(GENERALISATION_GAP)} for: {', '.join(overfit)}. The network has "
            f"{n_parameters} parameters for {n_train} training images, so it can fit the training "
            "set far better than it generalises; weight decay and early stopping are the usual "
            "remedies.")
    comments.append(
        f"The selected model reaches a training accuracy of {ACCURACY.format(selected['train_accuracy'])}, "
        f"a validation accuracy of {ACCURACY.format(selected['val_accuracy'])} and a test accuracy of "
        f"{ACCURACY.format(test['accuracy'])}.")

    manual = compare["manual_vs_torch"]
    steps = compare["manual_backward_vs_autograd"]
    return "\n\n".join([
        "## Answers to the assignment's questions",
        "**Which PyTorch methods correspond to the manual code?** `cifar2.backprop.backward` "
        "replaces `loss.backward()`: it fills the gradient of every weight and bias, which autograd "
        "would accumulate in `.grad`. `cifar2.optimizer.SGD.step` replaces `torch.optim.SGD.step()`, "
        "and `SGD.zero_grad` replaces `optimizer.zero_grad()`. At every training step the manual "
        f"gradients agree with autograd to {ERROR.format(steps['max_relative_error'])}, and trained "
        f"side by side the manual code stays within {ERROR.format(manual['max_loss_diff_checked'])} "
        f"(loss) and {ERROR.format(manual['max_param_diff_checked'])} (parameters) of PyTorch over "
        f"the first {manual['epochs_checked']} epochs.",
        "**How are the gradients checked?** Against autograd on every entry (largest relative "
        f"error {ERROR.format(gradcheck['max_error_autograd'])}) and against central finite "
        f"differences (L(w + h) - L(w - h)) / 2h on sampled entries (largest relative error "
        f"{ERROR.format(gradcheck['max_error_finite_diff'])}). The central formula has a "
        f"truncation error of order h^2 instead of h for the one-sided one, so with h = "
        f"{gradcheck['fd_step']:g} in float64 rounding is the main error left. Entries whose perturbation switches a ReLU "
        "on or off are skipped, because the loss has a kink there.",
        "**What are momentum and weight decay for?** Momentum keeps an exponentially weighted sum "
        "of past gradients (the buffer b <- mu * b + g), which damps oscillation across steep "
        "directions and speeds progress along shallow ones. Weight decay adds lambda * w to the gradient, the gradient of the L2 "
        "penalty (lambda / 2) ||w||^2, which keeps weights small and counters overfitting.",
        f"**Chosen parameters and their evaluation.** {selected['name']}: lr {selected['lr']:g}, "
        f"weight decay {selected['weight_decay']:g}, momentum {selected['momentum']:g}, chosen on "
        f"validation accuracy ({ACCURACY.format(selected['val_accuracy'])}); test accuracy "
        f"{ACCURACY.format(test['accuracy'])}.",
        "**Comments on the results.** " + " ".join(comments),
    ])


def render(data: Mapping[str, Any], gradcheck: Mapping[str, Any], compare: Mapping[str, Any],
           sweep: Sequence[Mapping[str, Any]], evaluation: Mapping[str, Any],
           setup: Mapping[str, Any]) -> str:
    """Return the whole report; ``setup`` holds the model and training parameters of the run."""
    widths = [N_INPUTS, *setup["hidden_sizes"], len(data["class_counts"]["train"])]
    sizes = "-".join(str(width) for width in widths)
    n_parameters = sum(n_in * n_out + n_out for n_in, n_out in zip(widths, widths[1:]))
    introduction = (
        f"MLP {sizes} with {setup['activation']} on the hidden layers and no output activation, "
        f"cross-entropy loss, {setup['epochs']} epochs, batch size {setup['batch_size']}, "
        f"training mode `{setup['mode']}`, seed {setup['seed']}. Generated by `dvc repro` from this "
        "run's metrics and plot files; do not edit by hand."
    )
    sections = [
        "# CIFAR-2: airplane vs bird with hand-written backpropagation and SGD",
        introduction,
        _data_section(data),
        _gradcheck_section(gradcheck),
        _compare_section(compare, setup["epochs"]),
        _sweep_section(sweep, evaluation["selected"]),
        _test_section(evaluation),
        _answers_section(gradcheck, compare, sweep, evaluation, n_parameters, data["size"]["train"]),
    ]
    return "\n\n".join(sections) + "\n"
