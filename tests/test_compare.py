"""The compare stage's checks: which epochs count against the tolerance, and where runs separate."""

from __future__ import annotations

import math

import pytest
import torch

from cifar2.training import build_model
from stages.compare import check_run, perturb_one_weight


def rows_with(differences: list[float], mode: str = "manual") -> list[dict]:
    return [{"epoch": epoch, f"loss_diff_{mode}": difference, f"param_diff_{mode}": difference / 2}
            for epoch, difference in enumerate(differences, start=1)]


def test_check_run_ignores_epochs_after_checked():
    failures = []
    result = check_run(rows_with([1e-16, 1e-15, 1e-3, 1e-2]), "manual", 1e-10, 2, "compare.tol_manual", failures)

    assert result["passed"]
    assert failures == []
    assert result["epochs_checked"] == 2
    assert result["max_loss_diff_checked"] == 1e-15
    assert result["max_param_diff_checked"] == 5e-16
    assert result["max_loss_diff"] == 1e-2
    assert result["final_param_diff"] == 5e-3
    assert result["separation_epoch"] == 3


def test_check_run_fails_within_checked_epochs():
    failures = []
    result = check_run(rows_with([1e-16, 1e-6, 1e-6]), "manual", 1e-10, 2, "compare.tol_manual", failures)

    assert not result["passed"]
    assert result["separation_epoch"] == 2
    assert len(failures) == 1
    assert "compare.tol_manual = 1e-10" in failures[0]
    assert "first 2 epochs" in failures[0]


def test_check_run_caps_checked_epochs_at_run_length():
    failures = []
    result = check_run(rows_with([0.0, 0.0], "manual_update"), "manual_update", 0.0, 10,
                       "compare.tol_manual_update", failures)

    assert result["passed"]
    assert result["epochs_checked"] == 2
    assert result["separation_epoch"] is None


@pytest.mark.parametrize("differences", [[0.0, 1e-300], [5e-324]], ids=["tiny_later", "tiny_first"])
def test_check_run_zero_tolerance_catches_any_difference(differences):
    failures = []
    result = check_run(rows_with(differences, "manual_update"), "manual_update", 0.0, 10,
                       "compare.tol_manual_update", failures)

    assert not result["passed"]
    assert len(failures) == 1


def test_perturb_one_weight_moves_one_ulp():
    model = build_model([4], "relu", 2, seed=0, dtype=torch.float64)
    before = [parameter.detach().clone() for parameter in model.parameters()]

    perturb_one_weight(model)

    after = list(model.parameters())
    changed = (after[0] != before[0]).nonzero().tolist()
    assert changed == [[0, 0]]
    original, moved = before[0][0, 0].item(), after[0][0, 0].item()
    assert moved > original
    assert torch.nextafter(torch.tensor(original, dtype=torch.float64),
                           torch.tensor(float("inf"), dtype=torch.float64)).item() == moved
    for name, old, new in zip(["bias 1", "weight 2", "bias 2"], before[1:], after[1:]):
        assert torch.equal(old, new), name


def test_check_run_fails_on_nan():
    failures = []
    result = check_run(rows_with([1e-16, math.nan, 1e-16]), "manual", 1e-10, 3, "compare.tol_manual", failures)

    assert not result["passed"]
    assert result["separation_epoch"] == 2
    assert math.isnan(result["max_loss_diff"])
    assert len(failures) == 1
