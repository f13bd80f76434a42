"""Typed, validated access to ``params.yaml``.

Every key of the pipeline is listed in ``SCHEMA`` with its validator. ``load_params`` checks the
whole file (unknown keys included) and returns a view restricted to the keys a stage declares. The
``check_params`` stage depends on the whole file, so ``dvc repro`` also rejects a typo in a key
that no other stage reads. A stage script lists those keys in its ``PARAMS`` tuple, and a test checks that the
tuple equals the stage's ``params:`` list in ``dvc.yaml``, so DVC re-runs a stage whenever a key
its code reads changes.

Numbers are accepted as strings too: ``dvc exp run -S train.lr=1e-6`` writes ``1e-06``, and PyYAML
reads an exponent without a decimal point as a string.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from cifar2.errors import ParamsError

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
ACTIVATIONS = ("relu", "tanh", "sigmoid", "identity")
TRAINING_MODES = ("torch", "manual_update", "manual")
CONFIG_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _fail(key: str, value: Any, rule: str, fix: str) -> ParamsError:
    return ParamsError(f"{key} = {value!r} is invalid: {rule}. {fix}")


def as_float(key: str, value: Any, low: float | None = None, high: float | None = None,
             low_inclusive: bool = True, high_inclusive: bool = True) -> float:
    """Convert ``value`` to a finite float inside the given bounds, or raise ``ParamsError``."""
    if isinstance(value, bool) or value is None:
        raise _fail(key, value, "expected a number", f"Set {key} to a number such as 0.01.")
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except (ValueError, OverflowError):
            raise _fail(key, value, "expected a number", f"Set {key} to a number such as 0.01.") from None
    elif isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:
            raise _fail(key, value, "expected a finite number", f"Set {key} to a finite number.") from None
    else:
        raise _fail(key, value, "expected a number", f"Set {key} to a number such as 0.01.")

    if not math.isfinite(number):
        raise _fail(key, value, "expected a finite number", f"Set {key} to a finite number.")

    lower_ok = low is None or (number >= low if low_inclusive else number > low)
    upper_ok = high is None or (number <= high if high_inclusive else number < high)
    if not (lower_ok and upper_ok):
        left = "" if low is None else f"{low} {'<=' if low_inclusive else '<'} "
        right = "" if high is None else f" {'<=' if high_inclusive else '<'} {high}"
        rule = f"must satisfy {left}{key}{right}"
        raise _fail(key, value, rule, "Choose a value in that range.")
    return number


def as_int(key: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """Convert ``value`` to an int no smaller than ``low``, or raise ``ParamsError``.

    Accepts ints, floats without a fractional part (``5.0``) and strings of either.
    """
    number: float | int
    if isinstance(value, bool) or value is None:
        raise _fail(key, value, "expected an integer", f"Set {key} to a whole number.")
    if isinstance(value, int):
        number = value
    else:
        try:
            number = as_float(key, value)
        except ParamsError:
            raise _fail(key, value, "expected an integer", f"Set {key} to a whole number.") from None
        if not number.is_integer():
            raise _fail(key, value, "expected an integer", f"Set {key} to a whole number.")
    number = int(number)
    if low is not None and number < low:
        raise _fail(key, value, f"must be >= {low}", f"Set {key} to {low} or more.")
    if high is not None and number > high:
        raise _fail(key, value, f"must be <= {high}", f"Set {key} to {high} or less.")
    return number


def as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _fail(key, value, "expected true or false", f"Set {key} to true or false.")


def as_choice(key: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise _fail(key, value, f"must be one of {', '.join(choices)}", f"Pick one of those for {key}.")
    return value


def as_string(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(key, value, "expected a non-empty string", f"Set {key} to a non-empty string.")
    return value


def as_md5(key: str, value: Any) -> str | None:
    """Return a lower-case md5 hex digest, or None when checking is switched off with ``null``."""
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{32}", value):
        raise _fail(key, value, "expected 32 hexadecimal digits or null",
                    f"Set {key} to the archive's published md5, or to null to skip the check.")
    return value.lower()


def as_classes(key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or len(value) < 2:
        raise _fail(key, value, "expected a list of at least two CIFAR-10 class names",
                    "List two or more classes, for example [airplane, bird].")
    for name in value:
        if name not in CIFAR10_CLASSES:
            raise _fail(key, name, f"unknown class; CIFAR-10 has {', '.join(CIFAR10_CLASSES)}",
                        "Use one of those names.")
    if len(set(value)) != len(value):
        raise _fail(key, value, "a class is listed twice", "List each class once.")
    return list(value)


def as_hidden_sizes(key: str, value: Any) -> list[int]:
    if not isinstance(value, list):
        raise _fail(key, value, "expected a list of layer widths", "Write it as [512, 128, 32].")
    return [as_int(f"{key}[{index}]", width, low=1) for index, width in enumerate(value)]


def validate_sweep_config(config: Any, key: str = "sweep.configs[]") -> dict[str, Any]:
    """Validate one sweep configuration and return it with typed values.

    Required: ``name``, ``weight_decay`` (>= 0) and ``momentum`` (0 <= momentum < 1). Optional:
    ``lr`` (> 0, defaults to ``train.lr``), ``dampening`` (0 <= dampening < 1, default 0) and
    ``nesterov`` (default false).
    """
    if not isinstance(config, Mapping):
        raise _fail(key, config, "expected a mapping with name, weight_decay and momentum",
                    "Write it as {name: wd0_m0, weight_decay: 0.0, momentum: 0.0}.")
    allowed = {"name", "lr", "weight_decay", "momentum", "dampening", "nesterov"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise _fail(f"{key}.{unknown[0]}", config[unknown[0]], "unknown key",
                    f"Remove it; allowed keys are {', '.join(sorted(allowed))}.")
    for required in ("name", "weight_decay", "momentum"):
        if required not in config:
            raise ParamsError(f"{key} is missing the key {required!r}: {dict(config)!r}. Add it.")

    name = config["name"]
    if not isinstance(name, str) or not CONFIG_NAME_PATTERN.match(name):
        raise _fail(f"{key}.name", name, "expected letters, digits, '_', '.' or '-'",
                    "Use a short name such as wd0.01_m0.9; it becomes a folder name.")
    result: dict[str, Any] = {
        "name": name,
        "weight_decay": as_float(f"{key}.weight_decay", config["weight_decay"], low=0.0),
        "momentum": as_float(f"{key}.momentum", config["momentum"], low=0.0, high=1.0,
                             high_inclusive=False),
        "dampening": as_float(f"{key}.dampening", config.get("dampening", 0.0), low=0.0, high=1.0,
                              high_inclusive=False),
        "nesterov": as_bool(f"{key}.nesterov", config.get("nesterov", False)),
    }
    if "lr" in config:
        result["lr"] = as_float(f"{key}.lr", config["lr"], low=0.0, low_inclusive=False)
    if result["nesterov"] and (result["momentum"] == 0.0 or result["dampening"] != 0.0):
        raise _fail(f"{key}.nesterov", True, "Nesterov momentum needs momentum > 0 and dampening 0",
                    "Set momentum above 0 and dampening to 0, or turn nesterov off.")
    return result


def as_sweep_configs(key: str, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise _fail(key, value, "expected a non-empty list of configurations",
                    "List at least one {name, weight_decay, momentum} mapping.")
    configs = [validate_sweep_config(item, f"{key}[{index}]") for index, item in enumerate(value)]
    names = [config["name"] for config in configs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise _fail(key, duplicates, "configuration names must be unique", "Rename the duplicates.")
    return configs


def _positive(key: str, value: Any) -> float:
    return as_float(key, value, low=0.0, low_inclusive=False)


def _non_negative(key: str, value: Any) -> float:
    return as_float(key, value, low=0.0)


def _momentum(key: str, value: Any) -> float:
    return as_float(key, value, low=0.0, high=1.0, high_inclusive=False)


def _at_least_one(key: str, value: Any) -> int:
    return as_int(key, value, low=1)


SCHEMA: dict[str, Callable[[str, Any], Any]] = {
    # torch.manual_seed takes at most a signed 64-bit integer.
    "base.seed": lambda key, value: as_int(key, value, low=0, high=2**63 - 1),
    "base.dtype": lambda key, value: as_choice(key, value, ("float64", "float32")),
    "base.device": lambda key, value: as_choice(key, value, ("auto", "cpu", "cuda")),
    "data.url": as_string,
    "data.md5": as_md5,
    "data.classes": as_classes,
    "split.validation_fraction": lambda key, value: as_float(
        key, value, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False),
    "model.hidden_sizes": as_hidden_sizes,
    "model.activation": lambda key, value: as_choice(key, value, ACTIVATIONS),
    "gradcheck.batch_size": _at_least_one,
    "gradcheck.fd_step": _positive,
    "gradcheck.fd_entries": _at_least_one,
    "gradcheck.tol_autograd": _non_negative,
    "gradcheck.tol_finite_diff": _non_negative,
    "train.lr": _positive,
    "train.epochs": _at_least_one,
    "train.batch_size": _at_least_one,
    "train.shuffle": as_bool,
    "train.mode": lambda key, value: as_choice(key, value, TRAINING_MODES),
    "compare.lr": _positive,
    "compare.weight_decay": _non_negative,
    "compare.momentum": _momentum,
    "compare.tol_manual_update": _non_negative,
    "compare.tol_gradient": _non_negative,
    "compare.tol_manual": _non_negative,
    "compare.tol_manual_epochs": _at_least_one,
    "sweep.configs": as_sweep_configs,
    # Each image is a cell of a committed PNG grid, so the counts are capped.
    "evaluate.misclassified_per_direction": lambda key, value: as_int(key, value, low=1, high=64),
    "evaluate.examples_per_class": lambda key, value: as_int(key, value, low=1, high=64),
}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping) and key not in SCHEMA:
            flat.update(_flatten(value, f"{key}."))
        else:
            flat[key] = value
    return flat


def read_params_file(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read and validate every key of ``path``; return a flat dict of typed values."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"Parameter file {path} not found. Run the stage from the project root.")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ParamsError(f"{path} is not UTF-8 text ({error}). Save it as UTF-8.") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path} is not valid YAML: {error}. Fix the syntax.") from None
    if not isinstance(tree, Mapping):
        raise ParamsError(f"{path} must contain a mapping of sections, found {type(tree).__name__}.")

    flat = _flatten(tree)
    unknown = sorted(set(flat) - set(SCHEMA))
    if unknown:
        raise ParamsError(f"{path}: unknown key {unknown[0]!r}. Known keys: {', '.join(SCHEMA)}. "
                          "Fix the spelling or remove it.")
    missing = sorted(set(SCHEMA) - set(flat))
    if missing:
        raise ParamsError(f"{path}: missing key {missing[0]!r}. Add it: the committed "
                          "params.yaml (git show HEAD:params.yaml) lists every key with its default.")
    return {key: SCHEMA[key](key, value) for key, value in flat.items()}


class Params(Mapping[str, Any]):
    """Read-only view of the validated keys that one stage declared.

    Reading a key the stage did not declare raises ``KeyError``, so a stage cannot depend on a
    parameter that DVC does not track for it.
    """

    def __init__(self, values: Mapping[str, Any], declared: Iterable[str]):
        self._declared = tuple(declared)
        self._values = {key: values[key] for key in self._declared}

    def __getitem__(self, key: str) -> Any:
        if key not in self._values:
            raise KeyError(f"{key!r} is not declared for this stage; add it to the stage's PARAMS "
                           "and to its params list in dvc.yaml.")
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def load_params(declared: Iterable[str], path: str | Path = "params.yaml") -> Params:
    """Validate ``path`` and return the keys in ``declared`` as a ``Params`` view."""
    declared = tuple(declared)
    unknown = [key for key in declared if key not in SCHEMA]
    if unknown:
        raise ParamsError(f"Stage declares unknown parameter {unknown[0]!r}; known: {', '.join(SCHEMA)}.")
    return Params(read_params_file(path), declared)
