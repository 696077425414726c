"""A suite task's error record, as bench/suite.py's run_task writes it and collect reads it."""


def error_record(task, error: str) -> dict:
    """The record of a task (bench.suite.Task) that gave no result: `error` says why."""
    return {"part": task.part, "label": task.label, "row": task.row, "seconds": 0.0,
            "error": {"part": task.part, "error": error, "traceback": ""}}  # fmt: skip


def time_budget_spent(time_budget_s: float) -> str:
    return f"not run: the time budget (--time-budget {time_budget_s:g} s) was spent before it started"
