"""Break a training step into its parts, to find where the manual mode and the GEMM fraction lose time.

Three measurements, each with its variants interleaved (the one that goes first rotates every
repeat) and reported as medians:

1. One step of mode ``manual`` and of mode ``torch`` (autograd), timed in four parts: forward
   with loss, backward, optimizer update, and the loss ``.item()`` with the accuracy count. The
   parts follow ``cifar2.training._step`` line by line.
2. ``backprop.backward`` with ``store_grad=True`` (as training runs it: each gradient is computed
   into ``model.dL_dw`` / ``dL_db`` and then copied into ``.grad``) and with ``store_grad=False``
   (no copies). The difference is the cost of the copies.
3. One update of the experiment's parameters by ``cifar2.optimizer.SGD`` and by
   ``torch.optim.SGD`` in its single-tensor (default on the CPU), ``foreach`` and ``fused`` forms.

The optimizer settings are the compare stage's (momentum and weight decay on). Run from the
repository root:

    python -m bench.step_parts [--repeats 300] [--warmup 30] [--threads N]
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Callable

import torch
import torch.nn.functional as F

from bench.common import (DEVICE, Timing, format_table, load_average, load_data, load_experiment,
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
    parser.add_argument("--threads", type=int,
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


def time_call(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
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

    # 2. The manual backward pass with and without the copies into .grad.
    model = new_model()
    x, y = batches[0]
    with torch.no_grad():
        output = model(x)
    gradient = loss_function.gradient(output, y)
    backward = interleave({
        "store_grad=True": lambda repeat: time_call(lambda: backprop.backward(model, gradient, store_grad=True)),
        "store_grad=False": lambda repeat: time_call(lambda: backprop.backward(model, gradient, store_grad=False)),
    }, arguments.repeats, arguments.warmup, "backward copies")

    # 3. One optimizer update of all parameters, with fixed random gradients.
    settings = dict(lr=experiment.optimizer.lr, momentum=experiment.optimizer.momentum,
                    weight_decay=experiment.optimizer.weight_decay)
    optimizers = {}
    for name, build in (("cifar2.optimizer.SGD", lambda p: SGD(p, **settings)),
                        ("torch.optim.SGD (single tensor)", lambda p: torch.optim.SGD(p, foreach=False, **settings)),
                        ("torch.optim.SGD foreach=True", lambda p: torch.optim.SGD(p, foreach=True, **settings)),
                        ("torch.optim.SGD fused=True", lambda p: torch.optim.SGD(p, fused=True, **settings))):
        parameters = list(new_model().parameters())
        for parameter in parameters:
            parameter.grad = torch.randn_like(parameter).mul_(1e-3)
        optimizers[name] = build(parameters)
    updates = interleave({name: (lambda repeat, optimizer=optimizer: time_call(optimizer.step))
                          for name, optimizer in optimizers.items()},
                         arguments.repeats, arguments.warmup, "optimizer updates")

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

    print("\n2. backprop.backward, batch", experiment.batch_size)
    with_copies = Timing.of(backward["store_grad=True"]).median
    without_copies = Timing.of(backward["store_grad=False"]).median
    print(format_table(["call", "median"], [
        ("store_grad=True (copies into .grad)", f"{with_copies * 1e3:.3f} ms"),
        ("store_grad=False", f"{without_copies * 1e3:.3f} ms"),
        ("cost of the copies", f"{(with_copies - without_copies) * 1e3:.3f} ms"),
    ]))

    print("\n3. One optimizer update of all parameters")
    print(format_table(["optimizer", "median"], [
        (name, f"{Timing.of(values).median * 1e3:.3f} ms") for name, values in updates.items()
    ]))


if __name__ == "__main__":
    main()
