"""Benchmark the training loop, and optionally the DVC pipeline around it.

(a) Per-epoch time of the three training modes (torch, manual_update, manual) of
    ``cifar2.training.Trainer`` on the experiment's MLP and the training split, with each mode's
    ratio to torch. An epoch is ``Trainer.run_epoch``: every training batch plus the validation
    pass, the same span that the stages record as ``train_seconds``.
(b) Training throughput against the machine's float64 matrix-multiply (GEMM) rate. The script
    times the exact matrix products that one epoch runs (forward ``addmm`` of every layer,
    ``delta.T @ a`` and ``delta @ W`` of the backward pass, the validation forward pass), with
    the same shapes, memory layouts and thread count, on preallocated outputs. The fraction
    ``GEMM time of the epoch / epoch time`` equals achieved FLOP/s over GEMM FLOP/s, and the
    target is >= 0.9. The script prints it three ways. The first uses the medians of all epochs.
    The second, which the target column judges, is the median over rounds of the fraction within
    a round. The third is the median over single steps, each paired with one run of a step's
    GEMMs (``--steps``). The nominal count
    ``6 x parameters x samples`` is printed too, but it includes the gradient with respect to the
    input images, which neither autograd nor the manual backward computes, so it overstates the
    work by about 1.5x.
(c) ``--pipeline``: ``dvc repro -f`` of a copy of the pipeline in a temporary repository, its wall
    time against the time spent inside training loops, and the time of a no-op ``dvc repro``.
(d) ``--memory``: peak resident memory (RSS) of one sweep stage process.

Epochs of the three modes alternate, and the order rotates every round, so load from other
processes hits every mode. The GEMM timings run between the rounds. Ratios taken within a round,
whose parts ran seconds apart, resist changes in load better than ratios of medians.

Run from the repository root:

    python -m bench.training [--epochs 10] [--repeats 10] [--pipeline] [--memory]
"""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from bench import pipeline
from bench.common import (thread_count, DEVICE, Data, Experiment, Timing, format_table, load_average, load_data,
                          load_experiment, machine_summary, set_threads, setup_logging)
from cifar2.network import N_INPUTS
from cifar2.training import MODES, Trainer, _step, build_model, evaluate

logger = logging.getLogger("bench.training")

TARGET_FRACTION = 0.9
# Batch size of the validation pass inside Trainer.run_epoch, read from evaluate's default.
EVALUATE_BATCH = inspect.signature(evaluate).parameters["batch_size"].default


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    parser.add_argument("--epochs", type=int, default=10,
                        help="timed epochs per training mode (default 10)")
    parser.add_argument("--warmup-epochs", type=int, default=1,
                        help="untimed epochs per mode before timing (default 1)")
    parser.add_argument("--repeats", type=int, default=10,
                        help="timings of each GEMM set after every round of epochs (default 10)")
    parser.add_argument("--steps", type=int, default=200,
                        help="single steps per mode, each paired with one GEMM set (default 200)")
    parser.add_argument("--threads", type=thread_count,
                        help="intra-op threads for PyTorch in this process (default: PyTorch's "
                             "choice); stage processes of --pipeline and --memory keep their default")
    parser.add_argument("--momentum", type=float,
                        help="SGD momentum for (a) and (b) (default: compare.momentum in params.yaml)")
    parser.add_argument("--weight-decay", type=float,
                        help="SGD weight decay for (a) and (b) (default: compare.weight_decay in params.yaml)")

    parser.add_argument("--no-loop", action="store_true",
                        help="skip sections (a) and (b), for example to run only --pipeline")
    parser.add_argument("--pipeline", action="store_true",
                        help="also time `dvc repro -f` and a no-op `dvc repro` in a temporary copy")
    parser.add_argument("--pipeline-epochs", type=int,
                        help="train.epochs for the temporary pipeline copy (default: params.yaml's)")
    parser.add_argument("--memory", action="store_true",
                        help="also measure the peak RSS of one sweep stage process")
    parser.add_argument("--memory-epochs", type=int,
                        help="train.epochs for the --memory sweep stage (default: params.yaml's)")
    parser.add_argument("--archive", default=None,
                        help="CIFAR-10 archive for the temporary pipeline (default: $CIFAR10_ARCHIVE)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary repositories of --pipeline and --memory")

    arguments = parser.parse_args()
    if arguments.epochs < 2 or arguments.warmup_epochs < 0 or arguments.repeats < 1 or arguments.steps < 2:
        parser.error("--epochs must be >= 2, --warmup-epochs >= 0, --repeats >= 1 and --steps >= 2.")
    if arguments.momentum is not None and not 0 <= arguments.momentum < 1:
        parser.error(f"--momentum must satisfy 0 <= momentum < 1, got {arguments.momentum}.")
    if arguments.weight_decay is not None and not 0 <= arguments.weight_decay < math.inf:
        parser.error(f"--weight-decay must be a finite number >= 0, got {arguments.weight_decay}.")
    for name in ("pipeline_epochs", "memory_epochs"):
        value = getattr(arguments, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}.")
    return arguments


@dataclass
class GemmSet:
    """The matrix products of one training step, or of one forward pass, at one batch size."""

    name: str
    batch: int
    runs_per_epoch: int
    flops: float
    products: list[Callable[[], torch.Tensor]]

    def run(self) -> None:
        for product in self.products:
            product()


def make_gemm_set(name: str, sizes: Sequence[int], batch: int, runs_per_epoch: int,
                  dtype: torch.dtype, backward: bool) -> GemmSet:
    """Build the products of a forward pass (and, with ``backward``, of backpropagation).

    Layer ``l`` runs ``addmm(b, a[l-1], W.T)`` forward, then ``delta.T @ a[l-1]`` for its weight
    gradient and, except for the first layer, ``delta @ W`` for the previous layer's delta. The
    weights are ``(n_out, n_in)`` and used transposed, as in ``nn.Linear``.
    """
    generator = torch.Generator().manual_seed(0)

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype)

    products: list[Callable[[], torch.Tensor]] = []
    flops = 0.0
    layers = list(zip(sizes, sizes[1:]))
    inputs = [random(batch, n_in) for n_in, _ in layers]
    weights = [random(n_out, n_in) for n_in, n_out in layers]
    for (n_in, n_out), a, w in zip(layers, inputs, weights):
        bias, z = random(n_out), torch.empty(batch, n_out, dtype=dtype)
        products.append(lambda bias=bias, a=a, w=w, z=z: torch.addmm(bias, a, w.t(), out=z))
        flops += 2.0 * batch * n_in * n_out

    if backward:
        for index in reversed(range(len(layers))):
            n_in, n_out = layers[index]
            a, w = inputs[index], weights[index]
            delta, weight_gradient = random(batch, n_out), torch.empty(n_out, n_in, dtype=dtype)
            products.append(lambda delta=delta, a=a, g=weight_gradient: torch.mm(delta.t(), a, out=g))
            flops += 2.0 * batch * n_in * n_out
            if index > 0:
                previous_delta = torch.empty(batch, n_in, dtype=dtype)
                products.append(lambda delta=delta, w=w, out=previous_delta: torch.mm(delta, w, out=out))
                flops += 2.0 * batch * n_in * n_out
    return GemmSet(name, batch, runs_per_epoch, flops, products)


def epoch_gemm_sets(sizes: Sequence[int], batch_size: int, n_train: int, n_validation: int,
                    dtype: torch.dtype) -> list[GemmSet]:
    """Build the GEMM sets of one ``Trainer.run_epoch``: full batches, the last partial batch and validation."""
    full, tail = divmod(n_train, batch_size)
    sets = [make_gemm_set(f"train step, batch {batch_size}", sizes, batch_size, full, dtype, True)]
    if tail:
        sets.append(make_gemm_set(f"train step, batch {tail}", sizes, tail, 1, dtype, True))
    validation_full, validation_tail = divmod(n_validation, EVALUATE_BATCH)
    if validation_full:
        sets.append(make_gemm_set(f"validation forward, batch {EVALUATE_BATCH}", sizes,
                                  EVALUATE_BATCH, validation_full, dtype, False))
    if validation_tail:
        sets.append(make_gemm_set(f"validation forward, batch {validation_tail}", sizes,
                                  validation_tail, 1, dtype, False))
    return sets


def time_call(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


@dataclass
class LoopResults:
    epochs: dict[str, Timing]
    paired_ratios: dict[str, Timing]
    gemms: dict[str, Timing]
    gemm_sets: list[GemmSet]
    paired_epoch_fractions: dict[str, Timing]
    paired_step_fractions: dict[str, Timing]
    load_before: str
    load_after: str


def make_trainers(experiment: Experiment, data: Data) -> dict[str, Trainer]:
    """Build one Trainer per mode, each with a model from the same seed."""
    trainers = {}
    for mode in MODES:
        model = build_model(experiment.hidden_sizes, experiment.activation, 2, experiment.seed,
                            experiment.dtype, DEVICE)
        trainers[mode] = Trainer(model, mode, experiment.optimizer, data.train_x, data.train_y,
                                 data.val_x, data.val_y, experiment.batch_size,
                                 shuffle=experiment.shuffle, seed=experiment.seed, description=mode)
    return trainers


def rotated(items: Sequence[str], shift: int) -> list[str]:
    shift %= len(items)
    return list(items[shift:]) + list(items[:shift])


def time_step_pairs(trainers: dict[str, Trainer], gemm_set: GemmSet, data: Data, batch_size: int,
                    steps: int) -> dict[str, list[float]]:
    """Alternate single training steps of every mode with the GEMM set of one step.

    Returns, per mode, the ratios ``GEMM set time / step time`` of the same repeat. A repeat
    lasts well under a second, so both parts of a ratio see the same machine load.
    """
    batches = [(data.train_x[start:start + batch_size], data.train_y[start:start + batch_size])
               for start in range(0, len(data.train_y) - batch_size + 1, batch_size)]
    ratios = {mode: [] for mode in MODES}
    for repeat in range(steps):
        x, y = batches[repeat % len(batches)]
        seconds = {}
        for name in rotated([*MODES, "gemm"], repeat):
            if name == "gemm":
                seconds[name] = time_call(gemm_set.run)
            else:
                trainer = trainers[name]
                seconds[name] = time_call(lambda: _step(trainer.model, trainer.optimizer, name, x, y))
        for mode in MODES:
            ratios[mode].append(seconds["gemm"] / seconds[mode])
    return ratios


def benchmark_loop(experiment: Experiment, data: Data, arguments: argparse.Namespace) -> LoopResults:
    """Run sections (a) and (b): interleaved epochs of the three modes, GEMM sets between rounds."""
    sizes = [N_INPUTS, *experiment.hidden_sizes, 2]
    trainers = make_trainers(experiment, data)
    gemm_sets = epoch_gemm_sets(sizes, experiment.batch_size, len(data.train_y), len(data.val_y),
                                experiment.dtype)

    epoch_samples = {mode: [] for mode in MODES}
    gemm_samples = {gemm_set.name: [] for gemm_set in gemm_sets}
    round_gemm_seconds = []
    rounds = arguments.warmup_epochs + arguments.epochs
    load_before = load_average()
    logger.info("Timing %d epochs per mode after %d warm-up epochs, %d threads, %d training samples, "
                "data: %s.", arguments.epochs, arguments.warmup_epochs, torch.get_num_threads(),
                len(data.train_y), data.source)
    for round_index in range(rounds):
        seconds = {}
        for mode in rotated(MODES, round_index):
            seconds[mode] = time_call(trainers[mode].run_epoch)
            if trainers[mode].result.diverged:
                raise RuntimeError(f"Training mode {mode} diverged in round {round_index + 1}; lower "
                                   "compare.lr in params.yaml or use fewer --epochs.")

        round_samples = {}
        for gemm_set in gemm_sets:
            round_samples[gemm_set.name] = [time_call(gemm_set.run) for _ in range(arguments.repeats)]
        gemm_epoch = sum(gemm_set.runs_per_epoch * statistics.median(round_samples[gemm_set.name])
                         for gemm_set in gemm_sets)

        timed = round_index >= arguments.warmup_epochs
        if timed:
            for mode, value in seconds.items():
                epoch_samples[mode].append(value)
            for name, values in round_samples.items():
                gemm_samples[name].extend(values)
            round_gemm_seconds.append(gemm_epoch)
        logger.info("Round %d of %d%s: %s, GEMMs of an epoch %.3f s.", round_index + 1, rounds,
                    "" if timed else " (warm-up)",
                    ", ".join(f"{mode} {seconds[mode]:.3f} s" for mode in MODES), gemm_epoch)

    logger.info("Timing %d single steps per mode, each paired with the GEMM set of one step.",
                arguments.steps)
    step_ratios = time_step_pairs(trainers, gemm_sets[0], data, experiment.batch_size, arguments.steps)

    # Ratios within one round compare epochs that ran within seconds of each other.
    paired_ratios = {mode: Timing.of([value / reference for value, reference
                                      in zip(epoch_samples[mode], epoch_samples["torch"])])
                     for mode in MODES}
    paired_epoch_fractions = {mode: Timing.of([gemm / value for gemm, value
                                               in zip(round_gemm_seconds, epoch_samples[mode])])
                              for mode in MODES}
    return LoopResults(
        epochs={mode: Timing.of(values) for mode, values in epoch_samples.items()},
        paired_ratios=paired_ratios,
        gemms={name: Timing.of(values) for name, values in gemm_samples.items()},
        gemm_sets=gemm_sets,
        paired_epoch_fractions=paired_epoch_fractions,
        paired_step_fractions={mode: Timing.of(values) for mode, values in step_ratios.items()},
        load_before=load_before, load_after=load_average())


def parameter_count(sizes: Sequence[int]) -> int:
    return sum(n_in * n_out + n_out for n_in, n_out in zip(sizes, sizes[1:]))


def report_loop(experiment: Experiment, data: Data, results: LoopResults) -> None:
    sizes = [N_INPUTS, *experiment.hidden_sizes, 2]
    print()
    print(format_table(["setting", "value"], machine_summary()[:-1] + [
        ("model", " -> ".join(map(str, sizes)) + f", {experiment.activation}, {experiment.dtype}, "
                  f"{parameter_count(sizes):,} parameters"),
        ("training", f"{len(data.train_y)} samples, batch {experiment.batch_size}, "
                     f"shuffle={experiment.shuffle}, {len(data.val_y)} validation samples"),
        ("optimizer", f"lr={experiment.optimizer.lr}, momentum={experiment.optimizer.momentum}, "
                      f"weight_decay={experiment.optimizer.weight_decay}"),
        ("data", data.source),
        ("load average before / after", f"{results.load_before} / {results.load_after}"),
    ]))

    torch_epoch = results.epochs["torch"].median
    print("\n(a) Per-epoch time (Trainer.run_epoch: training batches and validation pass)")
    print(format_table(["mode", "median epoch", "quartiles (Q1-Q3)", "epochs timed",
                        "ratio to torch (medians)", "median per-round ratio"], [
        (mode, f"{timing.median:.3f} s", f"{timing.q1:.3f}-{timing.q3:.3f} s", timing.count,
         f"{timing.median / torch_epoch:.3f}", f"{results.paired_ratios[mode].median:.3f}")
        for mode, timing in results.epochs.items()
    ]))

    gemm_epoch_seconds = sum(gemm_set.runs_per_epoch * results.gemms[gemm_set.name].median
                             for gemm_set in results.gemm_sets)
    gemm_epoch_flops = sum(gemm_set.runs_per_epoch * gemm_set.flops for gemm_set in results.gemm_sets)
    gemm_rate = gemm_epoch_flops / gemm_epoch_seconds
    nominal_flops = (6.0 * parameter_count(sizes) * len(data.train_y)
                     + 2.0 * parameter_count(sizes) * len(data.val_y))

    print("\n(b) Matrix products of one epoch, timed alone (same shapes, layouts and threads)")
    print(format_table(["GEMM set", "runs per epoch", "GFLOP per run", "median time", "GFLOP/s"], [
        (gemm_set.name, gemm_set.runs_per_epoch, f"{gemm_set.flops / 1e9:.4f}",
         f"{results.gemms[gemm_set.name].median * 1e3:.2f} ms",
         f"{gemm_set.flops / results.gemms[gemm_set.name].median / 1e9:.1f}")
        for gemm_set in results.gemm_sets
    ] + [("whole epoch", "", f"{gemm_epoch_flops / 1e9:.3f}", f"{gemm_epoch_seconds * 1e3:.1f} ms",
          f"{gemm_rate / 1e9:.1f}")]))
    print("\n(b) Training throughput against the GEMM rate "
          f"({gemm_rate / 1e9:.1f} GFLOP/s over the epoch's products)")
    rows = []
    for mode, timing in results.epochs.items():
        per_round = results.paired_epoch_fractions[mode].median
        rows.append((mode, f"{gemm_epoch_flops / timing.median / 1e9:.1f}",
                     f"{gemm_epoch_seconds / timing.median:.3f}", f"{per_round:.3f}",
                     "met" if per_round >= TARGET_FRACTION else "missed",
                     f"{results.paired_step_fractions[mode].median:.3f}",
                     f"{nominal_flops / timing.median / 1e9:.1f}",
                     f"{nominal_flops / timing.median / gemm_rate:.3f}"))
    print(format_table(["mode", "GFLOP/s (products run)", "fraction (medians)",
                        "fraction (median per round)", f"target >= {TARGET_FRACTION}",
                        "fraction (median per step pair)", "GFLOP/s (nominal 6PN)",
                        "nominal fraction"], rows))
    print(f"Products run per epoch: {gemm_epoch_flops / 1e9:.3f} GFLOP. Nominal count "
          f"6 x {parameter_count(sizes):,} parameters x {len(data.train_y)} training samples + "
          f"2 x parameters x {len(data.val_y)} validation samples: {nominal_flops / 1e9:.3f} GFLOP.")


def main() -> None:
    arguments = parse_arguments()
    setup_logging()
    set_threads(arguments.threads)
    if arguments.no_loop and not (arguments.pipeline or arguments.memory):
        raise SystemExit("--no-loop leaves nothing to run; add --pipeline or --memory.")
    experiment = load_experiment(arguments.momentum, arguments.weight_decay)
    data = results = None
    if not arguments.no_loop:
        data = load_data(experiment.dtype, experiment.seed)
        results = benchmark_loop(experiment, data, arguments)
    pipeline_result = memory_result = None
    if arguments.pipeline:
        pipeline_result = pipeline.benchmark_pipeline(arguments.archive, arguments.pipeline_epochs,
                                                      arguments.keep)
    if arguments.memory:
        memory_result = pipeline.benchmark_memory(arguments.archive, arguments.memory_epochs,
                                                  arguments.keep)

    if results is not None:
        report_loop(experiment, data, results)
    if pipeline_result is not None:
        pipeline.report_pipeline(pipeline_result)
    if memory_result is not None:
        pipeline.report_memory(memory_result)


if __name__ == "__main__":
    main()
