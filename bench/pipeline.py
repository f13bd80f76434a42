"""Sections (c) and (d) of ``bench.training``: the DVC pipeline and the memory of one sweep stage.

Both run in a new temporary git repository that contains a copy of the code, ``dvc.yaml`` and
``params.yaml`` from the working tree, so the repository's own pipeline outputs are never touched.
Commands run with the directory of the current Python interpreter first on ``PATH``, so ``dvc``
and ``python`` come from the same virtual environment.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import psutil
import yaml

from bench.common import REPO_ROOT, format_table, load_average

logger = logging.getLogger("bench.pipeline")

COPIED_REQUIRED = ("cifar2", "stages", "dvc.yaml", "params.yaml")
COPIED_OPTIONAL = (".gitignore", ".dvcignore")
DVC_PLOTS = Path(".dvc") / "plots"
TARGET_OVERHEAD = 0.15
POLL_SECONDS = 0.1
RUNNING_STAGE = re.compile(r"Running stage '([^']+)'")
CONFIG_NAME = re.compile(r"--name\s+(\S+)")
MIB = 2**20


def resolve_archive(archive: str | None) -> Path:
    value = archive or os.environ.get("CIFAR10_ARCHIVE")
    if not value:
        raise ValueError("No CIFAR-10 archive for the temporary pipeline: pass --archive or set "
                         "CIFAR10_ARCHIVE to a local cifar-10-python.tar.gz.")
    path = Path(value).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 archive {path} not found; pass --archive with an existing file.")
    return path


def tool_environment(archive: Path) -> dict[str, str]:
    """Environment for the stage commands: this interpreter's bin folder first, the archive, no analytics."""
    environment = dict(os.environ)
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"
    environment["CIFAR10_ARCHIVE"] = str(archive)
    # DVC would otherwise try to send usage analytics over the network.
    environment["DVC_NO_ANALYTICS"] = "1"
    if shutil.which("dvc", path=environment["PATH"]) is None:
        raise FileNotFoundError(f"dvc not found in {Path(sys.executable).parent} or on PATH; "
                                "run the benchmark with the project's .venv activated.")
    return environment


def set_epochs(params_path: Path, epochs: int) -> None:
    """Set ``train.epochs`` in a copied ``params.yaml``, which loses its comments."""
    params = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    params["train"]["epochs"] = epochs
    params_path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def run_checked(command: Sequence[str], cwd: Path, environment: dict[str, str]) -> None:
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed in {cwd} with exit status "
                           f"{result.returncode}: {result.stderr.strip()}")


def prepare_repository(prefix: str, environment: dict[str, str], epochs: int | None) -> Path:
    """Copy the pipeline into a new temporary git repository and run ``dvc init`` there."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in COPIED_REQUIRED + COPIED_OPTIONAL:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=ignore)
        elif source.is_file():
            shutil.copy2(source, root / name)
        elif name in COPIED_REQUIRED:
            raise FileNotFoundError(f"{source} not found; run the benchmark from a complete checkout.")
    if epochs is not None:
        set_epochs(root / "params.yaml", epochs)
        logger.info("Set train.epochs = %d in %s.", epochs, root / "params.yaml")

    run_checked(["git", "init", "-q"], root, environment)
    run_checked(["dvc", "init", "-q"], root, environment)
    run_checked(["dvc", "config", "core.analytics", "false"], root, environment)
    if (REPO_ROOT / DVC_PLOTS).is_dir():
        shutil.copytree(REPO_ROOT / DVC_PLOTS, root / DVC_PLOTS, dirs_exist_ok=True)
    logger.info("Prepared the temporary repository %s.", root)
    return root


@contextmanager
def temporary_repository(prefix: str, environment: dict[str, str], epochs: int | None, keep: bool,
                         logs: str) -> Iterator[Path]:
    """Yield a prepared copy of the pipeline, and delete it afterwards unless ``keep``."""
    repo = prepare_repository(prefix, environment, epochs)
    try:
        yield repo
    finally:
        if not keep:
            shutil.rmtree(repo, ignore_errors=True)
    if keep:
        logger.info("Kept %s with the logs %s.", repo, logs)


def stage_process_name(process: psutil.Process) -> str | None:
    """Return ``stages.<name> [--name config]`` for a stage's Python process, or None for other processes."""
    try:
        arguments = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    for index, argument in enumerate(arguments[:-1]):
        if argument == "-m" and arguments[index + 1].startswith("stages."):
            name = CONFIG_NAME.search(" ".join(arguments[index + 2:]))
            return arguments[index + 1] + (f" --name {name.group(1)}" if name else "")
    return None


def stage_process_name_from_command(command: str) -> str | None:
    """Return the key that ``TreeMonitor`` uses for the process of ``command``, e.g. ``stages.sweep --name x``."""
    parts = command.split()
    if len(parts) < 3 or parts[1] != "-m" or not parts[2].startswith("stages."):
        return None
    name = CONFIG_NAME.search(command)
    return parts[2] + (f" --name {name.group(1)}" if name else "")


class TreeMonitor(threading.Thread):
    """Sampler of the RSS of a process and its descendants, which keeps the maximum per stage process.

    It samples every ``POLL_SECONDS`` and can miss a shorter peak, so these maxima are lower bounds.
    """

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.peaks: dict[str, int] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for process in processes:
                name = "dvc" if process.pid == self.root.pid else stage_process_name(process)
                if name is None:
                    continue
                try:
                    rss = process.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                self.peaks[name] = max(self.peaks.get(name, 0), rss)
            self.stopped.wait(POLL_SECONDS)

    def stop(self) -> None:
        self.stopped.set()
        self.join()


@dataclass
class ReproRun:
    wall_seconds: float
    stage_starts: list[tuple[str, float]]
    peak_rss: dict[str, int]
    log: Path


def run_repro(repo: Path, environment: dict[str, str], arguments: Sequence[str], log: Path) -> ReproRun:
    """Run ``dvc repro`` with ``arguments``, copy its output to ``log`` and note when each stage starts."""
    command = ["dvc", "repro", *arguments]
    logger.info("Running %s in %s; output goes to %s.", " ".join(command), repo, log)
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=repo, env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    monitor = TreeMonitor(process.pid)
    monitor.start()
    stage_starts = []
    with log.open("w", encoding="utf-8") as log_file:
        for line in process.stdout:
            log_file.write(line)
            match = RUNNING_STAGE.search(line)
            if match:
                stage_starts.append((match.group(1), time.perf_counter() - started))
                logger.info("Stage %s started after %.1f s.", match.group(1), stage_starts[-1][1])
    status = process.wait()
    wall = time.perf_counter() - started
    monitor.stop()
    if status != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit status {status}; see {log}.")
    return ReproRun(wall, stage_starts, monitor.peaks, log)


def training_seconds(repo: Path) -> dict[str, float]:
    """Seconds spent inside training loops per stage, from the stages' own metrics files."""
    seconds = {}
    compare = json.loads((repo / "metrics" / "compare.json").read_text(encoding="utf-8"))
    # The per-step gradient check runs inside the torch run's loop, but the stage reports it apart.
    seconds["compare"] = (sum(final["train_seconds"] for final in compare["final"].values())
                          + compare["manual_backward_vs_autograd"]["seconds"])

    lock = yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))
    for stage, entry in lock["stages"].items():
        name = CONFIG_NAME.search(entry.get("cmd", "")) if stage.startswith("sweep") else None
        if name:
            metrics_path = repo / "results" / "sweep" / name.group(1) / "metrics.json"
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
            seconds[stage] = metrics["train_seconds"]
    return seconds


@dataclass
class PipelineResult:
    repo: Path
    full: ReproRun
    no_op: ReproRun
    train_seconds: dict[str, float]
    stage_commands: dict[str, str]
    load_before: str
    load_after: str


def benchmark_pipeline(archive: str | None, epochs: int | None, keep: bool) -> PipelineResult:
    """Section (c): ``dvc repro -f`` of a temporary copy, then a no-op ``dvc repro``."""
    environment = tool_environment(resolve_archive(archive))
    with temporary_repository("cifar2-bench-pipeline-", environment, epochs, keep,
                              "repro-full.log and repro-noop.log") as repo:
        load_before = load_average()
        full = run_repro(repo, environment, ["-f"], repo / "repro-full.log")
        no_op = run_repro(repo, environment, [], repo / "repro-noop.log")
        load_after = load_average()
        lock = yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))
        commands = {stage: entry.get("cmd", "") for stage, entry in lock["stages"].items()}
        result = PipelineResult(repo, full, no_op, training_seconds(repo), commands, load_before,
                                load_after)
    return result


def stage_durations(run: ReproRun) -> list[tuple[str, float]]:
    """Return the time from each stage's start line to the next one. The first row is DVC's start-up."""
    starts = [("(dvc start-up, before the first stage)", 0.0), *run.stage_starts]
    ends = [start for _, start in starts[1:]] + [run.wall_seconds]
    return [(stage, end - start) for (stage, start), end in zip(starts, ends)]


def report_pipeline(result: PipelineResult) -> None:
    rows = []
    for stage, seconds in stage_durations(result.full):
        command = result.stage_commands.get(stage, "")
        process_name = stage_process_name_from_command(command)
        peak = result.full.peak_rss.get(process_name) if process_name else None
        train = result.train_seconds.get(stage)
        rows.append((stage, f"{seconds:.1f}", "" if train is None else f"{train:.1f}",
                     f"{seconds - (train or 0.0):.1f}", "" if peak is None else f"{peak / MIB:.0f}"))
    wall = result.full.wall_seconds
    train_total = sum(result.train_seconds.values())
    overhead = (wall - train_total) / train_total
    print("\n(c) dvc repro -f in a temporary copy (stage time runs from one 'Running stage' line "
          "to the next, so it includes DVC's hashing and caching of the stage's outputs)")
    print(format_table(["stage", "wall s", "inside training loops s", "outside s", "peak RSS MiB"],
                       rows))
    dvc_peak = result.full.peak_rss.get("dvc")
    print(f"wall time {wall:.1f} s, inside training loops {train_total:.1f} s, outside "
          f"{wall - train_total:.1f} s ({(wall - train_total) / wall:.1%} of the wall time)")
    print(f"overhead (wall - training) / training: {overhead:.1%} (target <= {TARGET_OVERHEAD:.0%}: "
          f"{'met' if overhead <= TARGET_OVERHEAD else 'missed'})")
    print(f"no-op dvc repro right after: {result.no_op.wall_seconds:.2f} s, "
          f"{len(result.no_op.stage_starts)} stages ran")
    if dvc_peak is not None:
        print(f"peak RSS of the dvc process itself: {dvc_peak / MIB:.0f} MiB (sampled every {POLL_SECONDS} s)")
    print(f"load average before / after: {result.load_before} / {result.load_after}")


@dataclass
class ProcessMemory:
    label: str
    command: list[str]
    max_rss: int
    sampled_peak: int
    seconds: float


# Runs the command in argv[2:] and writes its peak RSS (ru_maxrss, KiB on Linux) to argv[1]. On
# Linux, exec keeps in ru_maxrss the peak RSS of the address space it replaces, which for a child
# of this benchmark is this process's. Measured directly, `python -c "import torch"` reported this
# process's 1424 MiB. The launcher is small, so the number it reads is the command's own.
LAUNCHER = """
import resource, subprocess, sys
status = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as output:
    output.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(status)
"""


def measure_process(label: str, command: list[str], cwd: Path, environment: dict[str, str],
                    log: Path) -> ProcessMemory:
    """Run ``command`` and return its peak RSS from the kernel (``ru_maxrss``) and from sampling."""
    max_rss_file = log.with_suffix(".maxrss")
    started = time.perf_counter()
    sampled_peak = 0
    with log.open("w", encoding="utf-8") as log_file:
        launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(max_rss_file), *command],
                                    cwd=cwd, env=environment, stdout=log_file, stderr=subprocess.STDOUT)
        parent = psutil.Process(launcher.pid)
        while launcher.poll() is None:
            try:
                for process in parent.children():
                    sampled_peak = max(sampled_peak, process.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                pass
            time.sleep(POLL_SECONDS / 2)
    seconds = time.perf_counter() - started
    if launcher.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit status {launcher.returncode}; see {log}.")
    max_rss = int(max_rss_file.read_text()) * 1024
    return ProcessMemory(label, command, max_rss, sampled_peak, seconds)


@dataclass
class MemoryResult:
    repo: Path
    epochs: int
    processes: list[ProcessMemory] = field(default_factory=list)
    load_before: str = ""
    load_after: str = ""


def provide_data(repo: Path, environment: dict[str, str]) -> None:
    """Copy the extracted data and split into ``repo``, or make them there with the first two stages."""
    target = repo / "data"
    target.mkdir(exist_ok=True)
    sources = [REPO_ROOT / "data" / "cifar2.npz", REPO_ROOT / "data" / "split.npz"]
    if all(source.is_file() for source in sources):
        for source in sources:
            shutil.copy2(source, target / source.name)
        return
    logger.info("%s has no data/cifar2.npz and data/split.npz, so the download and normalize "
                "stages make them in %s.", REPO_ROOT, repo)
    for stage in ("stages.download", "stages.normalize"):
        run_checked([sys.executable, "-m", stage], repo, environment)


def benchmark_memory(archive: str | None, epochs: int | None, keep: bool) -> MemoryResult:
    """Section (d): peak RSS of one sweep stage process, with ``import`` baselines."""
    environment = tool_environment(resolve_archive(archive))
    with temporary_repository("cifar2-bench-memory-", environment, epochs, keep, "memory-*.log") as repo:
        provide_data(repo, environment)
        params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
        result = MemoryResult(repo, params["train"]["epochs"], load_before=load_average())
        commands = [
            ("python -c 'import torch'", [sys.executable, "-c", "import torch"]),
            ("python -c 'import stages.sweep'", [sys.executable, "-c", "import stages.sweep"]),
            ("sweep stage", [sys.executable, "-m", "stages.sweep", "--name", "bench_memory",
                             "--weight_decay", "0", "--momentum", "0.9"]),
        ]
        for index, (label, command) in enumerate(commands):
            logger.info("Measuring the memory of %s.", label)
            result.processes.append(measure_process(label, command, repo, environment,
                                                    repo / f"memory-{index}.log"))
        result.load_after = load_average()
    return result


def report_memory(result: MemoryResult) -> None:
    print(f"\n(d) Peak resident memory (sweep stage with train.epochs = {result.epochs})")
    print(format_table(["process", "ru_maxrss MiB", f"sampled peak MiB (every {POLL_SECONDS / 2} s)",
                        "wall s"], [
        (process.label, f"{process.max_rss / MIB:.0f}", f"{process.sampled_peak / MIB:.0f}",
         f"{process.seconds:.1f}")
        for process in result.processes
    ]))
    print(f"load average before / after: {result.load_before} / {result.load_after}")
