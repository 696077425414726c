"""The report generator renders every committed results file (CPU: no GPU needed to read results)."""
import glob
import json
import os

import pytest

from bench.report import render

RESULTS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "bench", "results", "*.json")))


@pytest.mark.parametrize("path", RESULTS, ids=os.path.basename)
def test_renders_saved_results(path):
    with open(path) as f:
        report = json.load(f)
    text = render(report)
    assert text.startswith(f"### {report['benchmark']}")
    assert text.count("\n|") >= 3  # a header, a rule and at least one row of a table


def test_results_are_committed():
    assert {json.load(open(p))["benchmark"] for p in RESULTS} >= {"kernels", "attention", "model", "sampling"}


def test_unknown_benchmark_is_an_error():
    with pytest.raises(ValueError, match="unknown benchmark 'nope' in results; known: kernels, kernel_sweep, attention"):
        render({"benchmark": "nope"})
