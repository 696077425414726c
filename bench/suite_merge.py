"""One report from several saved suite runs of the same GPU model (`python -m bench --merge A.json B.json`).

For a full suite that does not fit in one sitting: run it in slices (`--parts`, `--models`), then merge them.
Row parts (training, sampling, scaling) gather their rows from every run; a whole part (flops, kernels,
attention, model, train_step) must come from one run only, and so must each row. The merged report keeps every
run's command, commit, date, wall time and matmul peak under "runs"; each row's MFU stays against its own run's
peak. Runs on different GPU models, quick and full runs, or a part or row measured twice are errors. A task
that failed in one run and was measured in another (a slice re-run) loses its error.
"""

ROW_LABELS = {  # the label of the task that measured a row (bench/suite.py's part_tasks)
    "training": "training {model} {variant}",
    "sampling": "sampling {model} {config}",
    "scaling": "scaling x{gpus}",
}
STALE_ERROR_PARTS = ("plots",)  # redrawn when the merged report is written


def run_summaries(report: dict) -> list[dict]:
    """The command, commit, date, wall time, GPUs and matmul peak of each run in a report (a merged one has several)."""
    if "runs" in report:
        return report["runs"]
    return [{
        "command": report["command"], "commit": report["env"]["commit"], "date": report["env"]["date"],
        "total_s": report["total_s"], "gpu_count": report["env"].get("gpu_count", "?"),
        "gpus_in_parallel": report.get("gpus_in_parallel", 1),
        "bf16_matmul_peak_tflops": report["bf16_matmul_peak_tflops"],
    }]  # fmt: skip


def check_alike(reports: list[dict], names: list[str]) -> None:
    for field, value_of in (("GPU", lambda r: r["env"].get("gpu")), ("--quick", lambda r: r["quick"])):
        values = {name: value_of(report) for name, report in zip(names, reports)}
        if len(set(values.values())) > 1:
            raise ValueError(f"cannot merge runs with different {field}: {values}")


def merge_part(part: str, merged: dict, result: dict, name: str, source: dict) -> None:
    """Add one run's result of `part` to `merged` (parts by name); `source` maps task labels to their run."""
    if part not in ROW_LABELS:
        if part in source:
            raise ValueError(f"part {part!r} was measured in both {source[part]} and {name}; keep one of them")
        merged[part], source[part] = result, name
        return
    rows = merged.setdefault(part, {"rows": []})["rows"]
    for row in result["rows"]:
        label = ROW_LABELS[part].format(**row)
        if label in source:
            raise ValueError(f"{label!r} was measured in both {source[label]} and {name}; keep one of them")
        rows.append(row)
        source[label] = name


def merge(reports: list[dict], names: list[str]) -> dict:
    """The merged report of saved suite reports (names label them in errors, e.g. their paths)."""
    if len(reports) < 2:
        raise ValueError(f"--merge needs at least two saved runs, got {len(reports)}")
    check_alike(reports, names)
    parts, source, errors, seconds, skipped_everywhere = {}, {}, {}, {}, None
    for report, name in zip(reports, names):
        for part, result in report["parts"].items():
            merge_part(part, parts, result, name, source)
        errors.update(report["errors"])
        for part, value in report["seconds"].items():
            seconds[part] = round(seconds.get(part, 0.0) + value, 1)
        skipped = report["skipped"]
        skipped_everywhere = skipped if skipped_everywhere is None else {
            part: reason for part, reason in skipped_everywhere.items() if part in skipped
        }  # fmt: skip
    errors = {
        label: error for label, error in errors.items() if label not in source and error["part"] not in STALE_ERROR_PARTS
    }  # fmt: skip
    first = reports[0]
    return {
        "benchmark": "suite", "quick": first["quick"], "command": "python -m bench --merge " + " ".join(names),
        "env": first["env"], "runs": [run for report in reports for run in run_summaries(report)],
        "bf16_matmul_peak_tflops": first["bf16_matmul_peak_tflops"], "parts": parts,
        "skipped": {part: reason for part, reason in skipped_everywhere.items() if part not in parts},
        "errors": errors, "seconds": seconds, "total_s": round(sum(report["total_s"] for report in reports), 1),
    }  # fmt: skip
