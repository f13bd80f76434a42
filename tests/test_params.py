"""Tests of cifar2.params: the real params.yaml, each validation rule, DVC-style overrides and Params."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from cifar2.errors import ParamsError
from cifar2.params import CIFAR10_CLASSES, SCHEMA, load_params, read_params_file, validate_sweep_config
from conftest import PROJECT_ROOT

REAL_PARAMS = PROJECT_ROOT / "params.yaml"


def real_tree() -> dict[str, Any]:
    return yaml.safe_load(REAL_PARAMS.read_text(encoding="utf-8"))


def set_value(tree: dict[str, Any], path: tuple, value: Any) -> None:
    """Set ``tree[path[0]][path[1]]...`` to ``value``. A list index in ``path`` is an int."""
    node = tree
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value


def write_params(folder: Path, tree: dict[str, Any]) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    return path


def edited_params(folder: Path, path: tuple, value: Any) -> Path:
    """Write a copy of the real params.yaml with one value replaced."""
    tree = real_tree()
    set_value(tree, path, value)
    return write_params(folder, tree)


def test_real_params_validate():
    values = read_params_file(REAL_PARAMS)

    assert set(values) == set(SCHEMA)


def test_real_params_types():
    values = read_params_file(REAL_PARAMS)

    assert type(values["train.epochs"]) is int
    assert type(values["train.lr"]) is float
    assert type(values["train.shuffle"]) is bool
    assert all(name in CIFAR10_CLASSES for name in values["data.classes"])


def test_real_sweep_configs_typed():
    configs = read_params_file(REAL_PARAMS)["sweep.configs"]

    for config in configs:
        assert type(config["momentum"]) is float
        assert type(config["weight_decay"]) is float
        assert type(config["nesterov"]) is bool


# (test id, path inside the YAML tree, bad value, key the message must name)
INVALID_VALUES = [
    ("lr_zero", ("train", "lr"), 0, "train.lr"),
    ("lr_negative", ("train", "lr"), -0.01, "train.lr"),
    ("compare_lr_zero", ("compare", "lr"), 0.0, "compare.lr"),
    ("sweep_lr_zero", ("sweep", "configs", 0, "lr"), 0.0, "sweep.configs[0].lr"),
    ("momentum_negative", ("compare", "momentum"), -0.1, "compare.momentum"),
    ("momentum_one", ("compare", "momentum"), 1.0, "compare.momentum"),
    ("momentum_int_one", ("compare", "momentum"), 1, "compare.momentum"),
    ("momentum_above_one", ("compare", "momentum"), 1.5, "compare.momentum"),
    ("sweep_momentum_one", ("sweep", "configs", 4, "momentum"), 1.0, "sweep.configs[4].momentum"),
    ("sweep_momentum_negative", ("sweep", "configs", 1, "momentum"), -0.2,
     "sweep.configs[1].momentum"),
    ("weight_decay_negative", ("compare", "weight_decay"), -0.01, "compare.weight_decay"),
    ("sweep_weight_decay_negative", ("sweep", "configs", 2, "weight_decay"), -0.5,
     "sweep.configs[2].weight_decay"),
    ("validation_fraction_zero", ("split", "validation_fraction"), 0, "split.validation_fraction"),
    ("validation_fraction_one", ("split", "validation_fraction"), 1, "split.validation_fraction"),
    ("validation_fraction_float_one", ("split", "validation_fraction"), 1.0,
     "split.validation_fraction"),
    ("epochs_zero", ("train", "epochs"), 0, "train.epochs"),
    ("epochs_fraction", ("train", "epochs"), 5.5, "train.epochs"),
    ("batch_size_zero", ("train", "batch_size"), 0, "train.batch_size"),
    ("gradcheck_batch_size_zero", ("gradcheck", "batch_size"), 0, "gradcheck.batch_size"),
    ("lr_word", ("train", "lr"), "fast", "train.lr"),
    ("epochs_word", ("train", "epochs"), "ten", "train.epochs"),
    ("lr_nan", ("train", "lr"), "nan", "train.lr"),
    ("lr_bool", ("train", "lr"), True, "train.lr"),
    ("epochs_bool", ("train", "epochs"), True, "train.epochs"),
    ("sweep_momentum_bool", ("sweep", "configs", 0, "momentum"), False, "sweep.configs[0].momentum"),
    ("md5_short", ("data", "md5"), "c58f3010", "data.md5"),
    ("activation_unknown", ("model", "activation"), "gelu", "model.activation"),
    ("sweep_name_slash", ("sweep", "configs", 3, "name"), "a/b", "sweep.configs[3].name"),
]


@pytest.mark.parametrize("path, value, key", [case[1:] for case in INVALID_VALUES],
                         ids=[case[0] for case in INVALID_VALUES])
def test_invalid_value_named(tmp_path, path, value, key):
    params_file = edited_params(tmp_path, path, value)

    with pytest.raises(ParamsError) as raised:
        read_params_file(params_file)

    message = str(raised.value)
    assert key in message
    assert f"{key} = {value!r}" in message


def test_unknown_class_named(tmp_path):
    params_file = edited_params(tmp_path, ("data", "classes"), ["airplane", "plane"])

    with pytest.raises(ParamsError) as raised:
        read_params_file(params_file)

    message = str(raised.value)
    assert "data.classes" in message
    assert "'plane'" in message


def test_duplicate_class_named(tmp_path):
    params_file = edited_params(tmp_path, ("data", "classes"), ["bird", "airplane", "bird"])

    with pytest.raises(ParamsError) as raised:
        read_params_file(params_file)

    message = str(raised.value)
    assert "data.classes" in message
    assert "['bird', 'airplane', 'bird']" in message


def test_single_class_rejected(tmp_path):
    params_file = edited_params(tmp_path, ("data", "classes"), ["airplane"])

    with pytest.raises(ParamsError, match=r"data\.classes"):
        read_params_file(params_file)


def test_unknown_key_named(tmp_path):
    tree = real_tree()
    tree["train"]["epoch"] = tree["train"].pop("epochs")  # a typo inside the train section
    params_file = write_params(tmp_path, tree)

    with pytest.raises(ParamsError) as raised:
        read_params_file(params_file)

    assert "'train.epoch'" in str(raised.value)


def test_unknown_section_named(tmp_path):
    tree = real_tree()
    tree["trian"] = tree.pop("train")
    params_file = write_params(tmp_path, tree)

    with pytest.raises(ParamsError) as raised:
        read_params_file(params_file)

    assert "'trian." in str(raised.value)


def test_missing_key_named(tmp_path):
    tree = real_tree()
    del tree["gradcheck"]["fd_step"]
    params_file = write_params(tmp_path, tree)

    with pytest.raises(ParamsError) as raised:
        read_params_file(params_file)

    assert "'gradcheck.fd_step'" in str(raised.value)


def test_sweep_unknown_key_named(tmp_path):
    tree = real_tree()
    tree["sweep"]["configs"][2]["momentun"] = 0.5
    params_file = write_params(tmp_path, tree)

    with pytest.raises(ParamsError) as raised:
        read_params_file(params_file)

    assert "sweep.configs[2].momentun" in str(raised.value)


def test_sweep_missing_key_named(tmp_path):
    tree = real_tree()
    del tree["sweep"]["configs"][1]["weight_decay"]
    params_file = write_params(tmp_path, tree)

    with pytest.raises(ParamsError) as raised:
        read_params_file(params_file)

    message = str(raised.value)
    assert "sweep.configs[1]" in message
    assert "'weight_decay'" in message


def test_sweep_duplicate_names_named(tmp_path):
    tree = real_tree()
    configs = tree["sweep"]["configs"]
    configs[3]["name"] = configs[0]["name"]
    params_file = write_params(tmp_path, tree)

    with pytest.raises(ParamsError) as raised:
        read_params_file(params_file)

    message = str(raised.value)
    assert "sweep.configs" in message
    assert repr(configs[0]["name"]) in message


def test_sweep_empty_list_rejected(tmp_path):
    params_file = edited_params(tmp_path, ("sweep", "configs"), [])

    with pytest.raises(ParamsError, match=r"sweep\.configs = \[\]"):
        read_params_file(params_file)


def test_nesterov_without_momentum_rejected(tmp_path):
    tree = real_tree()
    config = tree["sweep"]["configs"][0]
    config.update(momentum=0.0, nesterov=True)
    params_file = write_params(tmp_path, tree)

    with pytest.raises(ParamsError) as raised:
        read_params_file(params_file)

    message = str(raised.value)
    assert "sweep.configs[0].nesterov" in message
    assert "momentum" in message


def test_sweep_config_momentum_bounds():
    base = {"name": "wd0_m", "weight_decay": 0.0}

    assert validate_sweep_config({**base, "momentum": 0.0})["momentum"] == 0.0
    assert validate_sweep_config({**base, "momentum": 0.999})["momentum"] == 0.999
    with pytest.raises(ParamsError, match=r"sweep\.configs\[\]\.momentum = 1\.0"):
        validate_sweep_config({**base, "momentum": 1.0})
    with pytest.raises(ParamsError, match=r"sweep\.configs\[\]\.momentum = -0\.1"):
        validate_sweep_config({**base, "momentum": -0.1})


def test_sweep_config_defaults():
    config = validate_sweep_config({"name": "plain", "weight_decay": 0, "momentum": 0})

    assert config["dampening"] == 0.0
    assert config["nesterov"] is False
    assert "lr" not in config
    assert type(config["weight_decay"]) is float


def test_sweep_config_nesterov_accepted():
    config = validate_sweep_config({"name": "nag", "weight_decay": 0.0, "momentum": 0.9,
                                    "nesterov": True, "lr": "1e-3"})

    assert config["nesterov"] is True
    assert config["lr"] == 0.001


def test_sweep_config_nesterov_dampening_rejected():
    config = {"name": "nag", "weight_decay": 0.0, "momentum": 0.9, "nesterov": True,
              "dampening": 0.5}

    with pytest.raises(ParamsError, match="nesterov"):
        validate_sweep_config(config)


def test_sweep_config_not_mapping():
    with pytest.raises(ParamsError, match="expected a mapping"):
        validate_sweep_config(["wd0", 0.0, 0.0], key="sweep.configs[7]")


def test_exponent_string_accepted(tmp_path):
    # DVC 3.67 writes the override `-S train.lr=1e-6` as the plain scalar 1e-06, and PyYAML reads
    # it as a string because it has no decimal point.
    tree = real_tree()
    tree["train"]["lr"] = "1e-06"
    text = yaml.safe_dump(tree, sort_keys=False).replace("lr: '1e-06'", "lr: 1e-06")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(text, encoding="utf-8")
    assert yaml.safe_load(text)["train"]["lr"] == "1e-06"  # precondition: PyYAML gives a str

    lr = read_params_file(params_file)["train.lr"]

    assert type(lr) is float
    assert lr == 1e-06


def test_float_string_for_int_accepted(tmp_path):
    params_file = edited_params(tmp_path, ("train", "epochs"), "5.0")

    epochs = read_params_file(params_file)["train.epochs"]

    assert type(epochs) is int
    assert epochs == 5


def test_float_for_int_accepted(tmp_path):
    # DVC 3.67 writes an override such as `-S train.epochs=5.0` as the float 5.0.
    params_file = edited_params(tmp_path, ("train", "batch_size"), 64.0)

    batch_size = read_params_file(params_file)["train.batch_size"]

    assert type(batch_size) is int
    assert batch_size == 64


def test_int_for_float_accepted(tmp_path):
    params_file = edited_params(tmp_path, ("compare", "weight_decay"), 0)

    weight_decay = read_params_file(params_file)["compare.weight_decay"]

    assert type(weight_decay) is float
    assert weight_decay == 0.0


def test_bool_string_accepted(tmp_path):
    params_file = edited_params(tmp_path, ("train", "shuffle"), "True")

    assert read_params_file(params_file)["train.shuffle"] is True


def test_md5_lowercased(tmp_path):
    params_file = edited_params(tmp_path, ("data", "md5"), "C58F30108F718F92721AF3B95E74349A")

    assert read_params_file(params_file)["data.md5"] == "c58f30108f718f92721af3b95e74349a"


def test_params_view_undeclared_key():
    params = load_params(("train.lr", "train.epochs"), REAL_PARAMS)

    with pytest.raises(KeyError, match="train.batch_size"):
        params["train.batch_size"]


def test_params_view_declared_keys():
    params = load_params(("train.epochs", "train.lr"), REAL_PARAMS)

    assert list(params) == ["train.epochs", "train.lr"]
    assert "train.batch_size" not in params
    assert params.get("train.batch_size") is None


def test_load_params_unknown_declared():
    with pytest.raises(ParamsError, match="'train.learning_rate'"):
        load_params(("train.learning_rate",), REAL_PARAMS)


def test_load_params_validates_whole_file(tmp_path):
    # The stage declares only train.lr, but an invalid key elsewhere still stops it.
    params_file = edited_params(tmp_path, ("compare", "momentum"), 2.0)

    with pytest.raises(ParamsError, match="compare.momentum"):
        load_params(("train.lr",), params_file)


def test_invalid_yaml_rejected(tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text("train:\n  lr: [0.01\n  epochs: 5\n", encoding="utf-8")

    with pytest.raises(ParamsError) as raised:
        read_params_file(params_file)

    message = str(raised.value)
    assert str(params_file) in message
    assert "YAML" in message


def test_missing_file_rejected(tmp_path):
    params_file = tmp_path / "absent" / "params.yaml"

    with pytest.raises(ParamsError, match="not found") as raised:
        read_params_file(params_file)

    assert str(params_file) in str(raised.value)


@pytest.mark.parametrize("text", ["", "- base\n- data\n", "just a string\n"],
                         ids=["empty", "list", "scalar"])
def test_non_mapping_file_rejected(tmp_path, text):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(text, encoding="utf-8")

    with pytest.raises(ParamsError, match="mapping"):
        read_params_file(params_file)


def test_valid_edit_accepted(tmp_path):
    # A valid edit must pass, which shows that the failures above come from the edited values.
    params_file = edited_params(tmp_path, ("train", "lr"), 0.5)

    values = read_params_file(params_file)

    assert values["train.lr"] == 0.5
    assert values["train.epochs"] == read_params_file(REAL_PARAMS)["train.epochs"]


def test_huge_int_rejected(tmp_path):
    params_file = edited_params(tmp_path, ("train", "lr"), 10 ** 400)

    with pytest.raises(ParamsError, match="train.lr"):
        read_params_file(params_file)


def test_non_utf8_file_rejected(tmp_path):
    text = REAL_PARAMS.read_text(encoding="utf-8") + "# r\xe9sum\xe9 in Latin-1\n"
    params_file = tmp_path / "params.yaml"
    params_file.write_bytes(text.encode("latin-1"))

    with pytest.raises(ParamsError):
        read_params_file(params_file)


@pytest.mark.parametrize("value", ["abc", [1, 2], float("inf")], ids=["string", "list", "infinity"])
def test_non_number_for_int_asks_whole_number(tmp_path, value):
    params_file = edited_params(tmp_path, ("compare", "tol_manual_epochs"), value)

    with pytest.raises(ParamsError) as raised:
        read_params_file(params_file)

    message = str(raised.value)
    assert "compare.tol_manual_epochs" in message
    assert "expected an integer" in message
    assert "whole number" in message


def test_missing_key_names_committed_defaults(tmp_path):
    tree = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    del tree["compare"]["tol_gradient"]
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tree))

    with pytest.raises(ParamsError, match=r"missing key 'compare.tol_gradient'.*git show HEAD:params.yaml"):
        read_params_file(params_file)
