"""Benchmark one training step: manual backpropagation and SGD against autograd and torch.optim.SGD.

Both variants run the training loop's own step function, ``cifar2.training._step``, on the
experiment's MLP (``params.yaml``: model, ``train.batch_size``, ``base.dtype``, and the compare
stage's optimizer settings):

    manual     forward under no_grad, ``backprop.backward``, ``cifar2.optimizer.SGD``
    autograd   forward, ``loss.backward()``, ``torch.optim.SGD`` (training mode ``torch``)

A step is forward, loss, backward and update, plus the loss ``.item()`` and the count of correct
predictions that the training loop takes from every step. Each variant has its own model built
from the same seed, and both get the same batch at each repeat, cycling through the full batches of
the training split. After a warm-up the two alternate, and the one that goes first swaps at every
repeat, so load from other processes and cache effects hit both alike. The result is the ratio of
the median step times, manual / autograd; the target is <= 1.0.

Run from the repository root:

    python -m bench.step [--repeats 300] [--warmup 30] [--threads N] [--profile]
"""

from __future__ import annotations

import argparse
import logging
import math
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import (thread_count, DEVICE, Timing, format_table, load_average, load_data, load_experiment,
                          machine_summary, set_threads, setup_logging)
from cifar2.training import _step, build_model, make_optimizer

logger = logging.getLogger("bench.step")

# Training mode of cifar2.training for each variant.
VARIANTS = {"manual": "manual", "autograd": "torch"}
TARGET_RATIO = 1.0


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=300,
                        help="timed steps per variant (default 300)")
    parser.add_argument("--warmup", type=int, default=30,
                        help="untimed steps per variant before timing (default 30)")
    parser.add_argument("--threads", type=thread_count,
                        help="intra-op threads for PyTorch (default: PyTorch's choice)")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, profile each variant with torch.profiler and print the "
                             "operators with the most self CPU time")
    parser.add_argument("--profile-steps", type=int, default=20,
                        help="steps per variant under the profiler (default 20)")
    arguments = parser.parse_args()
    if arguments.repeats < 2 or arguments.warmup < 0 or arguments.profile_steps < 1:
        parser.error("--repeats must be >= 2, --warmup >= 0 and --profile-steps >= 1.")
    return arguments


def full_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split ``x`` and ``y`` in stored order into the batches that have exactly ``batch_size`` samples."""
    return [(x[start:start + batch_size], y[start:start + batch_size])
            for start in range(0, len(y) - batch_size + 1, batch_size)]


def run_step(model, optimizer, mode: str, x: torch.Tensor, y: torch.Tensor) -> float:
    """Run one training step and return its wall time in seconds."""
    started = time.perf_counter()
    loss, _ = _step(model, optimizer, mode, x, y)
    elapsed = time.perf_counter() - started
    if not math.isfinite(loss):
        raise RuntimeError(f"Training mode {mode} diverged during the benchmark (loss {loss}); "
                           "lower compare.lr in params.yaml or use fewer --repeats.")
    return elapsed


def print_profiles(models, optimizers, batches, steps: int) -> None:
    for variant, mode in VARIANTS.items():
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for index in range(steps):
                x, y = batches[index % len(batches)]
                _step(models[variant], optimizers[variant], mode, x, y)
        print(f"\ntorch.profiler, {variant}, {steps} steps, sorted by self CPU time:")
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    arguments = parse_arguments()
    setup_logging()
    set_threads(arguments.threads)
    experiment = load_experiment()
    load_before = load_average()

    data = load_data(experiment.dtype, experiment.seed)
    batches = full_batches(data.train_x, data.train_y, experiment.batch_size)
    if not batches:
        raise ValueError(f"The training split has {len(data.train_y)} samples, fewer than one batch "
                         f"of {experiment.batch_size}.")

    models, optimizers = {}, {}
    for variant, mode in VARIANTS.items():
        models[variant] = build_model(experiment.hidden_sizes, experiment.activation, 2,
                                      experiment.seed, experiment.dtype, DEVICE)
        optimizers[variant] = make_optimizer(models[variant], mode, experiment.optimizer)

    samples = {variant: [] for variant in VARIANTS}
    order = list(VARIANTS)
    total = arguments.warmup + arguments.repeats
    logger.info("Timing %d steps per variant after %d warm-up steps, %d threads, data: %s.",
                arguments.repeats, arguments.warmup, torch.get_num_threads(), data.source)
    for repeat in range(total):
        x, y = batches[repeat % len(batches)]
        for variant in (order if repeat % 2 == 0 else order[::-1]):
            elapsed = run_step(models[variant], optimizers[variant], VARIANTS[variant], x, y)
            if repeat >= arguments.warmup:
                samples[variant].append(elapsed)
        if (repeat + 1) % 100 == 0:
            logger.info("%d of %d repeats done.", repeat + 1, total)
    load_after = load_average()

    timings = {variant: Timing.of(values) for variant, values in samples.items()}
    ratio = timings["manual"].median / timings["autograd"].median
    # Both steps of a repeat run back to back, so the ratio within a repeat cancels slow drifts
    # in machine load that the ratio of medians keeps.
    paired = Timing.of([manual / autograd for manual, autograd
                        in zip(samples["manual"], samples["autograd"])])
    verdict = "met" if ratio <= TARGET_RATIO else "missed"

    sizes = [3 * 32 * 32, *experiment.hidden_sizes, 2]
    print()
    print(format_table(["setting", "value"], machine_summary()[:-1] + [
        ("model", " -> ".join(map(str, sizes)) + f", {experiment.activation}, {experiment.dtype}"),
        ("batch", f"{experiment.batch_size} samples, {len(batches)} distinct batches cycled"),
        ("optimizer", f"lr={experiment.optimizer.lr}, momentum={experiment.optimizer.momentum}, "
                      f"weight_decay={experiment.optimizer.weight_decay}"),
        ("data", data.source),
        ("load average before / after", f"{load_before} / {load_after}"),
    ]))
    print()
    print(format_table(["variant", "median step", "quartiles (Q1-Q3)", "steps timed"], [
        (f"{variant} ({VARIANTS[variant]} mode)", f"{timing.median * 1e3:.2f} ms",
         f"{timing.q1 * 1e3:.2f}-{timing.q3 * 1e3:.2f} ms", timing.count)
        for variant, timing in timings.items()
    ]))
    print(f"\nratio manual / autograd (median step time): {ratio:.3f} "
          f"(target <= {TARGET_RATIO}: {verdict})")
    print(f"median of the per-repeat ratios manual / autograd: {paired.median:.3f} "
          f"(quartiles {paired.q1:.3f}-{paired.q3:.3f})")

    if arguments.profile:
        print_profiles(models, optimizers, batches, arguments.profile_steps)


if __name__ == "__main__":
    main()
