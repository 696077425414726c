"""`python -m bench --quick` on a GPU: every quick part runs without error and writes its JSON, markdown and plots."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.configs import QUICK_MODELS, QUICK_SAMPLING_CONFIGS, QUICK_TRAIN_VARIANTS
from bench.plots import PLOTS

pytestmark = pytest.mark.gpu

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_quick_suite_writes_results_report_and_plots(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out-dir", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    (saved,) = tmp_path.glob("*-quick.json")
    report = json.loads(saved.read_text())
    assert report["errors"] == {} and report["quick"] is True
    parts = report["parts"]
    assert set(parts) == {"flops", "kernels", "attention", "training", "sampling"}
    trained = {(row["model"], row["variant"]) for row in parts["training"]["rows"]}
    assert trained == {(model, variant) for model in QUICK_MODELS for variant in QUICK_TRAIN_VARIANTS}
    assert all(row["batch"] == 64 and row["img_per_s"] > 0 for row in parts["training"]["rows"])
    sampled = {(row["model"], row["config"]) for row in parts["sampling"]["rows"]}
    assert sampled == {(model, config) for model in QUICK_MODELS for config in QUICK_SAMPLING_CONFIGS}
    assert set(report["skipped"]) == {"model", "train_step", "scaling"}
    stem = saved.name.removesuffix(".json")
    assert report["plots"] == [f"{stem}-{name}.png" for name in PLOTS]
    for name in report["plots"]:
        assert (tmp_path / name).stat().st_size > 10_000
    text = (tmp_path / f"{stem}.md").read_text()
    assert "## Targets" in text and "python -m bench --quick --out-dir" in text and "could not render" not in text
