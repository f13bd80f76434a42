"""Break a training step into its parts, to find where the manual mode and the GEMM fraction lose time.

Two measurements, each with its variants interleaved (the one that goes first rotates every
repeat) and reported as medians:

1. One step of mode ``manual`` and of mode ``torch`` (autograd), timed in four parts: forward
   with loss, backward, optimizer update, and the loss ``.item()`` with the accuracy count. The
   parts follow ``cifar2.training._step`` line by line, with the compare stage's optimizer
   settings (momentum and weight decay on).
2. One update of the experiment's parameters by ``cifar2.optimizer.SGD`` and by
   ``torch.optim.SGD`` in its single-tensor (default on the CPU) and ``fused`` forms, for plain
   SGD, SGD with momentum, and SGD with momentum and weight decay. The update is element-wise
   work limited by memory bandwidth, so its cost sets a ceiling on the fraction of the GEMM rate
   that training can reach.

Run from the repository root:

    python -m bench.step_parts [--repeats 300] [--warmup 30] [--threads N]
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Callable

import torch
import torch.nn.functional as F

from bench.common import (thread_count, DEVICE, Timing, format_table, load_average, load_data, load_experiment,
                          machine_summary, set_threads, setup_logging)
from bench.step import full_batches
from cifar2 import backprop
from cifar2.losses import CrossEntropy
from cifar2.optimizer import SGD
from cifar2.training import build_model, make_optimizer

logger = logging.getLogger("bench.step_parts")

PARTS = ("forward and loss", "backward", "update", "item and accuracy")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=300, help="timed repeats (default 300)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed repeats first (default 30)")
    parser.add_argument("--threads", type=thread_count,
                        help="intra-op threads for PyTorch (default: PyTorch's choice)")
    arguments = parser.parse_args()
    if arguments.repeats < 2 or arguments.warmup < 0:
        parser.error("--repeats must be >= 2 and --warmup >= 0.")
    return arguments


def manual_step_parts(model, optimizer, loss_function: CrossEntropy, x, y) -> list[float]:
    """Run the lines of ``_step`` for mode manual and return the seconds of its four parts."""
    marks = [time.perf_counter()]
    with torch.no_grad():
        output = model(x)
        loss = F.cross_entropy(output, y)
        marks.append(time.perf_counter())
        backprop.backward(model, loss_function.gradient(output, y))
    marks.append(time.perf_counter())
    optimizer.step()
    marks.append(time.perf_counter())
    loss.item()
    int((output.argmax(dim=1) == y).sum())
    marks.append(time.perf_counter())
    return [end - start for start, end in zip(marks, marks[1:])]


def autograd_step_parts(model, optimizer, x, y) -> list[float]:
    """Run the lines of ``_step`` for mode torch and return the seconds of its four parts."""
    marks = [time.perf_counter()]
    optimizer.zero_grad()
    output = model(x)
    loss = F.cross_entropy(output, y)
    marks.append(time.perf_counter())
    loss.backward()
    marks.append(time.perf_counter())
    optimizer.step()
    marks.append(time.perf_counter())
    loss.item()
    int((output.detach().argmax(dim=1) == y).sum())
    marks.append(time.perf_counter())
    return [end - start for start, end in zip(marks, marks[1:])]


def interleave(functions: dict[str, Callable[[int], object]], repeats: int, warmup: int,
               label: str) -> dict[str, list]:
    """Call every function once per repeat, in an order that rotates, and keep the timed results."""
    names = list(functions)
    results = {name: [] for name in names}
    for repeat in range(warmup + repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            value = functions[name](repeat)
            if repeat >= warmup:
                results[name].append(value)
    logger.info("Finished %s: %d repeats.", label, repeats)
    return results


def optimizer_parameters(optimizer) -> list[torch.Tensor]:
    if isinstance(optimizer, SGD):
        return optimizer.params
    return [p for group in optimizer.param_groups for p in group["params"]]


def timed_update(optimizer, gradients: list[torch.Tensor]) -> float:
    """Restore the saved gradients, then time one ``step``."""
    for parameter, gradient in zip(optimizer_parameters(optimizer), gradients):
        parameter.grad.copy_(gradient)
    started = time.perf_counter()
    optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    arguments = parse_arguments()
    setup_logging()
    set_threads(arguments.threads)
    experiment = load_experiment()
    data = load_data(experiment.dtype, experiment.seed)
    batches = full_batches(data.train_x, data.train_y, experiment.batch_size)
    load_before = load_average()

    def new_model():
        return build_model(experiment.hidden_sizes, experiment.activation, 2, experiment.seed,
                           experiment.dtype, DEVICE)

    # 1. Step parts of the two modes.
    manual_model, autograd_model = new_model(), new_model()
    manual_optimizer = make_optimizer(manual_model, "manual", experiment.optimizer)
    autograd_optimizer = make_optimizer(autograd_model, "torch", experiment.optimizer)
    loss_function = CrossEntropy()
    parts = interleave({
        "manual": lambda repeat: manual_step_parts(manual_model, manual_optimizer, loss_function,
                                                   *batches[repeat % len(batches)]),
        "autograd": lambda repeat: autograd_step_parts(autograd_model, autograd_optimizer,
                                                       *batches[repeat % len(batches)]),
    }, arguments.repeats, arguments.warmup, "step parts")

    # 2. One optimizer update of all parameters, with fixed random gradients, per setting.
    settings = {
        "plain": dict(lr=experiment.optimizer.lr),
        "momentum": dict(lr=experiment.optimizer.lr, momentum=experiment.optimizer.momentum),
        "momentum and weight decay": dict(lr=experiment.optimizer.lr, momentum=experiment.optimizer.momentum,
                                          weight_decay=experiment.optimizer.weight_decay),
    }
    builders = {
        "cifar2.optimizer.SGD": lambda parameters, options: SGD(parameters, **options),
        "torch.optim.SGD (single tensor)": lambda parameters, options: torch.optim.SGD(parameters, foreach=False, **options),
        "torch.optim.SGD fused=True": lambda parameters, options: torch.optim.SGD(parameters, fused=True, **options),
    }
    updates = {}
    for setting, options in settings.items():
        optimizers = {}
        for name, build in builders.items():
            parameters = list(new_model().parameters())
            for parameter in parameters:
                parameter.grad = torch.randn_like(parameter).mul_(1e-3)
            optimizers[name] = build(parameters, options)
        # The manual SGD writes into .grad, so every update of every variant starts from a fresh
        # copy of its gradients, and the copy is not timed.
        gradients = {name: [p.grad.clone() for p in optimizer_parameters(optimizer)]
                     for name, optimizer in optimizers.items()}
        updates[setting] = interleave(
            {name: (lambda repeat, optimizer=optimizer, saved=gradients[name]: timed_update(optimizer, saved))
             for name, optimizer in optimizers.items()},
            arguments.repeats, arguments.warmup, f"updates, {setting}")

    print()
    print(format_table(["setting", "value"], machine_summary()[:-1] + [
        ("optimizer", f"lr={experiment.optimizer.lr}, momentum={experiment.optimizer.momentum}, "
                      f"weight_decay={experiment.optimizer.weight_decay}"),
        ("data", data.source),
        ("load average before / after", f"{load_before} / {load_average()}"),
    ]))

    print("\n1. Parts of one training step, batch", experiment.batch_size)
    rows = []
    for index, part in enumerate(PARTS + ("whole step",)):
        medians = {}
        for variant in ("manual", "autograd"):
            values = [sum(sample) if part == "whole step" else sample[index] for sample in parts[variant]]
            medians[variant] = Timing.of(values).median
        rows.append((part, f"{medians['manual'] * 1e3:.3f} ms", f"{medians['autograd'] * 1e3:.3f} ms",
                     f"{(medians['manual'] - medians['autograd']) * 1e3:+.3f} ms"))
    print(format_table(["part", "manual", "autograd", "manual - autograd"], rows))

    print("\n2. One optimizer update of all parameters (median)")
    settings_header = [f"{setting} ({', '.join(f'{k}={v}' for k, v in options.items() if k != 'lr')})"
                       if len(options) > 1 else setting for setting, options in settings.items()]
    print(format_table(["optimizer", *settings_header], [
        (name, *(f"{Timing.of(updates[setting][name]).median * 1e3:.3f} ms" for setting in settings))
        for name in builders
    ]))

if __name__ == "__main__":
    main()
