"""End-to-end tests of the DVC pipeline: real DVC and git in a temporary copy of the project.

The copy runs on a small archive built here (random pixels, the official format) with a tiny
model, two epochs and three sweep configurations, one of which diverges on purpose.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT_ROOT, copy_project, make_batches, write_archive

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
PROJECT_FILES = ("cifar2", "stages", "dvc.yaml", "params.yaml", ".gitignore", ".dvcignore")
TINY_PARAMS = {
    "model": {"hidden_sizes": [24, 12]},
    "gradcheck": {"batch_size": 4, "fd_entries": 6},
    "train": {"epochs": 2, "batch_size": 16},
    "sweep": {"configs": [
        {"name": "steady", "weight_decay": 0.0, "momentum": 0.9},
        {"name": "decayed", "weight_decay": 0.01, "momentum": 0.0},
        {"name": "exploding", "weight_decay": 0.9, "momentum": 0.9, "lr": 1.0e12},
    ]},
    "evaluate": {"misclassified_per_direction": 3, "examples_per_class": 4},
}


def run(command: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if check and completed.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {completed.returncode}\n"
                             f"stdout:\n{completed.stdout[-4000:]}\nstderr:\n{completed.stderr[-4000:]}")
    return completed


def dvc(repo: Path, env: dict[str, str], *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([str(BIN / "dvc"), *arguments], repo, env, check)


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def deep_update(tree: dict, changes: dict) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            deep_update(tree[key], value)
        else:
            tree[key] = value


def edit_params(repo: Path, changes: dict) -> None:
    path = repo / "params.yaml"
    tree = yaml.safe_load(path.read_text())
    deep_update(tree, changes)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A git repository holding the project, reproduced once on a small archive and committed."""
    root = tmp_path_factory.mktemp("pipeline")
    archive = write_archive(root / "cifar-10-python.tar.gz", make_batches(per_class=12, seed=1))
    repo = copy_project(root / "project", PROJECT_FILES)

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "CIFAR10_ARCHIVE": str(archive), "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "test",
           "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "test",
           "GIT_COMMITTER_EMAIL": "test@example.com"}
    run(["git", "init", "-q", "-b", "main"], repo, env)
    dvc(repo, env, "init", "-q")
    shutil.copytree(PROJECT_ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")
    edit_params(repo, TINY_PARAMS)

    result = dvc(repo, env, "repro")
    (repo / "first_repro.log").write_text(result.stdout + result.stderr)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-q", "-m", "baseline"], repo, env)
    return repo, env


@pytest.fixture
def pipeline_copy(pipeline, tmp_path) -> tuple[Path, dict[str, str]]:
    """A private copy of the reproduced repository (with its DVC cache) for tests that change it."""
    repo, env = pipeline
    copy = tmp_path / "project"
    shutil.copytree(repo, copy, symlinks=True)
    return copy, env


def test_repro_writes_every_output(pipeline):
    repo, _ = pipeline
    declared = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for stage, entry in declared.items():
        for out in entry.get("outs", []):
            path = repo / out["path"]
            assert path.exists(), f"{stage} did not write {out['path']}"
    for path in (repo / "metrics").glob("*.json"):
        json.loads(path.read_text())
    assert (repo / "report" / "report.md").is_file()


def test_second_repro_runs_nothing(pipeline):
    repo, env = pipeline
    result = dvc(repo, env, "repro")
    assert ran_stages(result.stdout) == set()
    assert dvc(repo, env, "status", "--json").stdout.strip() in ("{}", "")


def test_selection_picks_best_eligible(pipeline):
    repo, _ = pipeline
    sweep = read_csv(repo / "plots" / "sweep.csv")
    evaluation = json.loads((repo / "metrics" / "evaluate.json").read_text())
    eligible = [row for row in sweep if row["diverged"] == "false"]
    best = max(float(row["val_accuracy"]) for row in eligible)
    assert float(next(row for row in sweep if row["name"] == evaluation["selected"]["name"])["val_accuracy"]) == best
    assert evaluation["selected"]["name"] != "exploding"


def test_diverged_config_recorded(pipeline):
    repo, _ = pipeline
    metrics = json.loads((repo / "results" / "sweep" / "exploding" / "metrics.json").read_text())
    assert metrics["diverged"] is True
    assert metrics["val_accuracy"] is None or metrics["epochs"] < TINY_PARAMS["train"]["epochs"]
    assert json.loads((repo / "metrics" / "sweep.json").read_text())["exploding"]["diverged"] is True


def test_confusion_matrix_counts_and_order(pipeline):
    repo, _ = pipeline
    records = json.loads((repo / "plots" / "confusion.json").read_text())
    evaluation = json.loads((repo / "metrics" / "evaluate.json").read_text())
    matrix = evaluation["confusion_matrix"]["rows_true_columns_predicted"]
    n_test = json.loads((repo / "metrics" / "data.json").read_text())["size"]["test"]
    assert len(records) == n_test
    assert sum(map(sum, matrix)) == n_test
    assert evaluation["confusion_matrix"]["labels"] == ["airplane", "bird"]
    for true_index, true_name in enumerate(["airplane", "bird"]):
        for predicted_index, predicted_name in enumerate(["airplane", "bird"]):
            count = sum(1 for r in records if r["actual"] == true_name and r["predicted"] == predicted_name)
            assert matrix[true_index][predicted_index] == count
    accuracy = (matrix[0][0] + matrix[1][1]) / n_test
    assert evaluation["test"]["accuracy"] == pytest.approx(accuracy, abs=1e-12)


def test_compare_and_gradcheck_pass(pipeline):
    repo, _ = pipeline
    compare = json.loads((repo / "metrics" / "compare.json").read_text())
    assert compare["manual_update_vs_torch"]["max_loss_diff"] == 0.0
    assert compare["manual_update_vs_torch"]["final_param_diff"] == 0.0
    assert compare["manual_vs_torch"]["final_param_diff"] <= 1e-10
    assert compare["manual_vs_torch"]["separation_epoch"] is None
    steps = compare["manual_backward_vs_autograd"]
    assert steps["max_relative_error"] <= 1e-10
    assert steps["steps"] > 0
    assert steps["passed"]
    control = compare["torch_perturbed_vs_torch"]
    assert 0.0 < control["max_param_diff_checked"] <= 1e-10
    assert set(compare["final"]) == {"torch", "manual_update", "manual", "torch_perturbed"}
    gradcheck = json.loads((repo / "metrics" / "gradcheck.json").read_text())
    assert gradcheck["max_error_autograd"] <= 1e-10
    assert gradcheck["max_error_finite_diff"] <= 1e-6


def _report_numbers(text: str) -> list[str]:
    return re.findall(r"(?<![\w.])-?\d+\.\d+(?:e[-+]\d+)?", text)


def test_report_numbers_match_metrics(pipeline):
    repo, _ = pipeline
    text = (repo / "report" / "report.md").read_text()
    evaluation = json.loads((repo / "metrics" / "evaluate.json").read_text())
    gradcheck = json.loads((repo / "metrics" / "gradcheck.json").read_text())
    compare = json.loads((repo / "metrics" / "compare.json").read_text())
    data = json.loads((repo / "metrics" / "data.json").read_text())
    sweep = read_csv(repo / "plots" / "sweep.csv")

    assert f"**{evaluation['test']['accuracy']:.4f}**" in text
    for name, precision in evaluation["test"]["precision"].items():
        recall = evaluation["test"]["recall"][name]
        assert f"| {name} | {precision:.4f} | {recall:.4f} |" in text
    for name, case in gradcheck["cases"].items():
        assert f"| {name} | {case['description']} | {case['max_error_autograd']:.2e} | " \
               f"{case['max_error_finite_diff']:.2e} |" in text
    manual = compare["manual_vs_torch"]
    assert f"| manual vs torch | {manual['epochs_checked']} | {manual['max_loss_diff_checked']:.2e} | " \
           f"{manual['max_param_diff_checked']:.2e} |" in text
    steps = compare["manual_backward_vs_autograd"]
    assert f"| {steps['steps']} | {steps['max_relative_error']:.2e} |" in text
    for split, size in data["size"].items():
        counts = " | ".join(str(count) for count in data["class_counts"][split].values())
        assert f"| {split} | {size} | {counts} |" in text
    for channel, mean in data["mean"].items():
        assert f"| {channel} | {mean:.4f} | {data['std'][channel]:.4f} |" in text
    for row in sweep:
        train_acc = f"{float(row['train_accuracy']):.4f}" if row["train_accuracy"] else "n/a"
        val_acc = f"{float(row['val_accuracy']):.4f}" if row["val_accuracy"] else "n/a"
        diverged = "yes" if row["diverged"] == "true" else "no"
        assert re.search(rf"\| {re.escape(row['name'])} \|.*\| {train_acc} \| {val_acc} \| {diverged} \|",
                         text), f"sweep row {row['name']} missing or different"

    # Every number printed in the report must come from the metrics: collect the formatted
    # values of all metrics files and check each number of the report is among them.
    allowed = set()

    def collect(value):
        if isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, list):
            for item in value:
                collect(item)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            allowed.update({f"{value:.4f}", f"{value:.2e}", f"{value:g}"})
    for document in (evaluation, gradcheck, compare, data):
        collect(document)
    for row in sweep:
        for key, value in row.items():
            if value not in ("", "true", "false") and key not in ("name", "mode"):
                collect(float(value))
        collect(float(row["train_accuracy"]) - float(row["val_accuracy"])
                if row["train_accuracy"] and row["val_accuracy"] else 0.0)
    collect([0.05, 0.95])  # the report's documented thresholds
    unexplained = [number for number in _report_numbers(text) if number not in allowed]
    assert unexplained == []


def test_report_images_exist(pipeline):
    repo, _ = pipeline
    text = (repo / "report" / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) == 6
    for image in images:
        assert not Path(image).is_absolute()
        assert (repo / "report" / image).is_file(), image


def test_exp_run_small_lr_reaches_stage_as_float(pipeline_copy):
    repo, env = pipeline_copy
    dvc(repo, env, "exp", "run", "-S", "train.lr=1e-6")
    assert "1e-06" in (repo / "params.yaml").read_text()
    metrics = json.loads((repo / "results" / "sweep" / "steady" / "metrics.json").read_text())
    assert isinstance(metrics["lr"], float)
    assert metrics["lr"] == 1e-6


def test_sweep_entry_edit_reruns_only_it(pipeline_copy):
    repo, env = pipeline_copy
    tree = yaml.safe_load((repo / "params.yaml").read_text())
    tree["sweep"]["configs"][1]["momentum"] = 0.5
    (repo / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    result = dvc(repo, env, "repro")
    assert ran_stages(result.stdout) == {"check_params", "sweep@config1", "evaluate", "report"}


def test_validation_fraction_skips_download(pipeline_copy):
    repo, env = pipeline_copy
    edit_params(repo, {"split": {"validation_fraction": 0.2}})
    ran = ran_stages(dvc(repo, env, "repro").stdout)
    assert "download" not in ran
    assert {"normalize", "gradcheck", "compare", "evaluate", "report"} <= ran
    assert {"sweep@config0", "sweep@config1", "sweep@config2"} <= ran


def test_metrics_diff_shows_changes(pipeline_copy):
    repo, env = pipeline_copy
    edit_params(repo, {"train": {"lr": 0.002}})
    dvc(repo, env, "repro")
    diff = json.loads(dvc(repo, env, "metrics", "diff", "--json").stdout)
    changed = {path: entries for path, entries in diff.items() if entries}
    assert "metrics/sweep.json" in changed
    numeric = [entry for entries in changed.values() for entry in entries.values()
               if isinstance(entry.get("diff"), (int, float)) and entry["diff"] != 0]
    assert numeric, diff


def test_queued_grid_runs_all_points(pipeline_copy):
    repo, env = pipeline_copy
    dvc(repo, env, "exp", "run", "--queue", "-S", "train.lr=0.005,0.02", "-S", "train.epochs=1,2")
    dvc(repo, env, "queue", "start", "-j", "1")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = dvc(repo, env, "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    dvc(repo, env, "queue", "stop", check=False)
    assert "Failed" not in status, status + dvc(repo, env, "queue", "logs", "--help", check=False).stdout

    shown = json.loads(dvc(repo, env, "exp", "show", "--json").stdout)
    experiments = [exp for entry in shown for exp in (entry.get("experiments") or [])]
    assert len(experiments) == 4
    for experiment in experiments:
        data = experiment["revs"][0]["data"]
        assert "metrics/evaluate.json" in data["metrics"]
        assert "accuracy" in data["metrics"]["metrics/evaluate.json"]["data"]["test"]


# The versions that dvc-render 1.0.2 loads from a CDN, installed from the npm registry instead,
# because the test machines have no internet access beyond the package registries.
VEGA_PACKAGES = {"vega": "5.20.2", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def vega_scripts(tmp_path_factory) -> list[Path]:
    if shutil.which("npm") is None:
        pytest.fail("npm is needed to install the Vega scripts for the plots page")
    folder = tmp_path_factory.mktemp("vega")
    packages = [f"{name}@{version}" for name, version in VEGA_PACKAGES.items()]
    # dvc-render pins vega 5.20.2 with vega-lite 5.2.0, whose declared peer range starts at vega
    # 5.21, so npm needs --legacy-peer-deps to install the exact combination DVC itself loads.
    installed = subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund",
                                "--legacy-peer-deps", "--prefix", str(folder), *packages],
                               capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    return [folder / "node_modules" / name / "build" / f"{name}.min.js" for name in VEGA_PACKAGES]


def test_plots_page_renders_in_chromium(pipeline, vega_scripts, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it with apt-get")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    repo, env = pipeline
    scripts = "\n".join(f'<script src="{path.as_uri()}"></script>' for path in vega_scripts)
    template = tmp_path / "template.html"
    template.write_text("<!DOCTYPE html><html><head><title>CIFAR-2 plots</title>" + scripts
                        + "</head><body>{plot_divs}</body></html>")
    out = tmp_path / "plots_page"
    dvc(repo, env, "plots", "show", "--html-template", str(template), "-o", str(out))
    page = out / "index.html"
    html = page.read_text()

    declared = yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]
    for entry in declared:
        name = entry if isinstance(entry, str) else next(iter(entry))
        assert name in html, f"plot {name!r} missing from the page"
    assert "cdn.jsdelivr.net" not in html

    screenshot = tmp_path / "plots.png"
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}",
               "--allow-file-access-from-files", "--enable-logging=stderr", "--v=0",
               "--virtual-time-budget=10000", "--window-size=1400,9000"]
    dom = subprocess.run([*browser, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=180)
    subprocess.run([*browser, f"--screenshot={screenshot}", page.as_uri()], capture_output=True,
                   text=True, timeout=180)
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    errors = [line for line in console if "error" in line.lower() or "uncaught" in line.lower()]
    assert errors == [], "\n".join(errors)
    vega_plots = sum(1 for entry in declared if isinstance(entry, dict))
    assert dom.stdout.count('class="marks"') >= vega_plots, "Vega did not draw every plot"
    assert screenshot.is_file()
    assert screenshot.stat().st_size > 10_000


def test_plots_diff_against_baseline(pipeline_copy):
    repo, env = pipeline_copy
    edit_params(repo, {"train": {"lr": 0.003}})
    dvc(repo, env, "repro")
    out = repo / "diff_page"
    dvc(repo, env, "plots", "diff", "HEAD", "-o", str(out))
    html = (out / "index.html").read_text()
    assert "HEAD" in html
    assert "workspace" in html


def test_repro_on_real_archive(real_archive, tmp_path):
    """The whole pipeline on the real airplane/bird images with the real model, for two epochs."""
    repo = copy_project(tmp_path / "project", PROJECT_FILES)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "CIFAR10_ARCHIVE": str(real_archive), "DVC_NO_ANALYTICS": "1"}
    run(["git", "init", "-q"], repo, env)
    dvc(repo, env, "init", "-q")
    shutil.copytree(PROJECT_ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")
    edit_params(repo, {"train": {"epochs": 2}, "sweep": {"configs": [
        {"name": "wd0.001_m0.9", "weight_decay": 0.001, "momentum": 0.9},
        {"name": "wd0_m0", "weight_decay": 0.0, "momentum": 0.0},
    ]}})
    dvc(repo, env, "repro")

    data = json.loads((repo / "metrics" / "data.json").read_text())
    assert data["size"] == {"train": 9000, "validation": 1000, "test": 2000}
    assert data["class_counts"]["test"] == {"airplane": 1000, "bird": 1000}
    evaluation = json.loads((repo / "metrics" / "evaluate.json").read_text())
    # Two epochs on real images already separate the classes far better than chance (0.5).
    assert evaluation["test"]["accuracy"] > 0.7
    assert json.loads((repo / "metrics" / "compare.json").read_text())["manual_vs_torch"]["passed"]


def test_forced_rerun_gives_identical_metrics(pipeline_copy):
    repo, env = pipeline_copy
    before = {name: (repo / name).read_bytes()
              for name in ("metrics/compare.json", "plots/compare.csv", "metrics/sweep.json")}
    dvc(repo, env, "repro", "-f", "compare", "sweep@config0", "sweep@config1", "evaluate")
    for name, content in before.items():
        if name == "metrics/compare.json":
            # Wall-clock training times differ between runs; everything else must not.
            old, new = json.loads(content), json.loads((repo / name).read_text())
            for mode in old["final"]:
                old["final"][mode].pop("train_seconds")
                new["final"][mode].pop("train_seconds")
            old["manual_backward_vs_autograd"].pop("seconds")
            new["manual_backward_vs_autograd"].pop("seconds")
            assert new == old
        else:
            assert (repo / name).read_bytes() == content, name


def test_misspelled_key_fails_repro(pipeline_copy):
    repo, env = pipeline_copy
    edit_params(repo, {"train": {"shufle": True}})
    result = dvc(repo, env, "repro", check=False)
    assert result.returncode != 0
    assert "train.shufle" in result.stdout + result.stderr


def test_bad_value_keeps_stage_outputs(pipeline_copy):
    repo, env = pipeline_copy
    outputs = [repo / "metrics" / "compare.json", repo / "plots" / "compare.csv", repo / "plots" / "compare.png"]
    before = {path: path.read_bytes() for path in outputs}
    edit_params(repo, {"compare": {"tol_manual": -1}})

    result = dvc(repo, env, "repro", "compare", check=False)

    assert result.returncode != 0
    assert "compare.tol_manual" in result.stdout + result.stderr
    assert "compare" not in ran_stages(result.stdout)
    for path, content in before.items():
        assert path.read_bytes() == content, f"{path.name} was removed or changed"

