"""dvc.yaml must declare, for every stage, the parameters and package modules its code uses.

DVC re-runs a stage only when a declared dependency changes, so an undeclared parameter or module
would leave stale results behind without any warning.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import yaml

from conftest import PROJECT_ROOT

DVC_YAML = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
STAGES = sorted(DVC_YAML["stages"])


def test_every_stage_script_exists():
    for stage in STAGES:
        assert (PROJECT_ROOT / "stages" / f"{stage}.py").is_file()
        assert DVC_YAML["stages"][stage]["cmd"].startswith(f"python -m stages.{stage}")


@pytest.mark.parametrize("stage", STAGES)
def test_declared_params_equal_stage_params(stage):
    module = importlib.import_module(f"stages.{stage}")
    declared = DVC_YAML["stages"][stage].get("params", [])
    if declared == [{"params.yaml": None}]:
        # The stage depends on every key of the file, so it must read every key too.
        from cifar2.params import SCHEMA

        declared = list(SCHEMA)
    assert sorted(declared) == sorted(module.PARAMS)


@pytest.mark.parametrize("stage", STAGES)
def test_declared_code_equals_imported_modules(stage):
    # A fresh interpreter, so modules imported by other tests do not count.
    code = (f"import importlib, sys; importlib.import_module('stages.{stage}'); "
            "print('\\n'.join(sorted(m for m in sys.modules if m == 'cifar2' or m.startswith('cifar2.'))))")
    imported = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True,
                              text=True, check=True).stdout.split()
    expected = {f"stages/{stage}.py"} | {
        "cifar2/__init__.py" if name == "cifar2" else name.replace(".", "/") + ".py" for name in imported}
    code_deps = {dep for dep in DVC_YAML["stages"][stage]["deps"]
                 if dep.endswith(".py")}
    assert code_deps == expected


def test_every_params_key_read_by_a_stage():
    from cifar2.params import SCHEMA

    used = set()
    for stage in STAGES:
        used.update(importlib.import_module(f"stages.{stage}").PARAMS)
    assert set(SCHEMA) - used == set()
