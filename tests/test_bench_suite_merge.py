"""Merging saved suite runs into one report (bench/suite_merge.py, `python -m bench --merge`), on the CPU."""

import copy
import json

import pytest

from bench import suite, suite_merge
from tests.test_bench_suite import synthetic_report

SLICES = {  # which parts each of two slices measured
    "a": ("flops", "kernels", "attention", "training"),
    "b": ("sampling", "model", "train_step", "scaling"),
}


def slice_of(report: dict, name: str, parts: tuple[str, ...]) -> dict:
    """The run that measured only `parts` of a full report, with its own command, commit and peak."""
    piece = copy.deepcopy(report)
    piece["parts"] = {part: result for part, result in report["parts"].items() if part in parts}
    piece["command"] = f"python -m bench --parts {' '.join(parts)}"
    piece["env"]["commit"] = f"commit-{name}"
    piece["bf16_matmul_peak_tflops"] = 700.0 if name == "a" else 710.0
    piece["skipped"] = {part: "not selected (--parts)" for part in suite.PARTS if part not in parts}
    piece["seconds"] = {part: 10.0 for part in parts}
    piece["total_s"] = 10.0 * len(parts)
    return piece


def two_slices() -> tuple[dict, dict]:
    full = json.loads(json.dumps(synthetic_report()))
    return slice_of(full, "a", SLICES["a"]), slice_of(full, "b", SLICES["b"])


def test_merged_slices_give_the_full_report_and_list_both_runs():
    full = json.loads(json.dumps(synthetic_report()))
    merged = suite_merge.merge(list(two_slices()), ["a.json", "b.json"])
    assert merged["parts"] == full["parts"]
    assert merged["skipped"] == {} and merged["errors"] == {}
    assert merged["total_s"] == 80.0 and merged["seconds"] == {part: 10.0 for part in full["parts"]}
    assert [run["commit"] for run in merged["runs"]] == ["commit-a", "commit-b"]
    assert [run["bf16_matmul_peak_tflops"] for run in merged["runs"]] == [700.0, 710.0]
    assert merged["command"] == "python -m bench --merge a.json b.json"


def test_rows_of_one_part_come_together_from_both_runs():
    a, b = two_slices()
    rows = a["parts"]["training"]["rows"]
    a["parts"]["training"]["rows"], b["parts"]["training"] = rows[:4], {"rows": rows[4:]}
    merged = suite_merge.merge([a, b], ["a.json", "b.json"])
    assert merged["parts"]["training"]["rows"] == rows


def test_a_part_or_row_measured_twice_is_an_error():
    a, b = two_slices()
    b["parts"]["kernels"] = a["parts"]["kernels"]
    with pytest.raises(ValueError, match="part 'kernels' was measured in both a.json and b.json"):
        suite_merge.merge([a, b], ["a.json", "b.json"])
    a, b = two_slices()
    b["parts"]["training"] = {"rows": a["parts"]["training"]["rows"][:1]}
    with pytest.raises(ValueError, match="'training DiT-S/2 fast' was measured in both a.json and b.json"):
        suite_merge.merge([a, b], ["a.json", "b.json"])


def test_runs_on_different_gpus_or_quick_and_full_do_not_merge():
    a, b = two_slices()
    b["env"]["gpu"] = "NVIDIA H100 80GB HBM3"
    with pytest.raises(ValueError, match="different GPU"):
        suite_merge.merge([a, b], ["a.json", "b.json"])
    a, b = two_slices()
    b["quick"] = True
    with pytest.raises(ValueError, match="different --quick"):
        suite_merge.merge([a, b], ["a.json", "b.json"])
    with pytest.raises(ValueError, match="at least two"):
        suite_merge.merge([a], ["a.json"])


def test_a_failed_task_measured_again_in_another_run_loses_its_error():
    a, b = two_slices()
    rows = a["parts"]["training"]["rows"]
    failed = {("DiT-S/2", "fast"), ("DiT-B/2", "fast")}
    a["parts"]["training"]["rows"] = [row for row in rows if (row["model"], row["variant"]) not in failed]
    a["errors"]["training DiT-S/2 fast"] = {"part": "training", "error": "not run: the time budget", "traceback": ""}
    a["errors"]["training DiT-B/2 fast"] = {"part": "training", "error": "OutOfMemoryError()", "traceback": ""}
    a["errors"]["plot mfu"] = {"part": "plots", "error": "ValueError()"}
    b["parts"]["training"] = {"rows": rows[:1]}
    merged = suite_merge.merge([a, b], ["a.json", "b.json"])
    assert list(merged["errors"]) == ["training DiT-B/2 fast"]


def test_merge_saved_writes_one_report_naming_every_run(tmp_path):
    paths = []
    for name, piece in zip("ab", two_slices()):
        paths.append(str(tmp_path / f"{name}.json"))
        (tmp_path / f"{name}.json").write_text(json.dumps(piece))
    out = tmp_path / "merged"
    out.mkdir()
    written = suite.merge_saved(paths, str(out))
    assert written[:2] == [str(out / "nvidia-h200-2026-11-21.json"), str(out / "nvidia-h200-2026-11-21.md")]
    text = (out / "nvidia-h200-2026-11-21.md").read_text()
    assert "- merged from 2 runs" in text
    assert "`python -m bench --parts flops kernels attention training`: commit commit-a" in text
    assert "`python -m bench --parts sampling model train_step scaling`: commit commit-b" in text
    assert "could not render" not in text and "## Errors" not in text
