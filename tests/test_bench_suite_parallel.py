"""The suite spread over several GPUs (bench/suite_parallel.py), on the CPU: task order, claims, the workers'
records read back, and the error records of tasks that no worker finished."""

import pytest

from bench import suite, suite_parallel

TWO_WORKERS = ["", ""]  # CUDA_VISIBLE_DEVICES of each worker: no GPU, as in CI


def selection(parts: list[str]) -> dict:
    return {"quick": True, "parts": parts, "models": None, "peak_tflops": 700.0}


def quick_tasks(parts: list[str]) -> list[suite.Task]:
    tasks, _ = suite.plan(True, parts, None, gpu_count=2, peak_tflops=700.0)
    return tasks


def test_spread_order_starts_the_longest_tasks_and_leaves_scaling_to_the_parent():
    tasks, _ = suite.plan(False, list(suite.PARTS), None, gpu_count=4, peak_tflops=700.0)
    order = suite_parallel.spread_order(tasks)
    assert [task.part for task in order[:2]] == ["model", "train_step"]
    assert [task.label for task in order[2:]] == [
        task.label for task in tasks if task.part not in ("model", "train_step", "scaling")
    ]
    assert "scaling" in {task.part for task in tasks} and "scaling" not in {task.part for task in order}


def test_a_task_is_claimed_once(tmp_path):
    assert suite_parallel.claim(str(tmp_path), 3) is True
    assert suite_parallel.claim(str(tmp_path), 3) is False
    assert suite_parallel.claim(str(tmp_path), 4) is True


def test_two_workers_run_each_task_once_and_the_parent_reads_their_records():
    tasks = quick_tasks(["flops"])  # the one part that runs without a GPU
    (record,) = suite_parallel.run_on_gpus(tasks, selection(["flops"]), TWO_WORKERS)
    assert "error" not in record, record.get("error")
    assert record["label"] == "flops" and record["row"] is False and record["seconds"] > 0
    parts, errors, _ = suite.collect([record])
    assert errors == {} and len(parts["flops"]["rows"]) == 16


def test_tasks_past_the_time_budget_are_reported_as_not_run():
    tasks = quick_tasks(["flops", "kernels"])
    records = suite_parallel.run_on_gpus(tasks, selection(["flops", "kernels"]), TWO_WORKERS, time_budget_s=0)
    assert [r["label"] for r in records] == ["flops", "kernels"]
    for record in records:
        assert record["error"]["error"].startswith("not run: the time budget (--time-budget 0 s)")


def test_a_worker_that_fails_leaves_error_records_with_its_log():
    tasks = quick_tasks(["flops"])  # the workers build the kernels part's list instead: a mismatch, they stop
    (record,) = suite_parallel.run_on_gpus(tasks, selection(["kernels"]), TWO_WORKERS)
    assert record["label"] == "flops"
    assert record["error"]["error"].startswith("not run: every worker exited before it started")
    assert "task list differs from the parent's" in record["error"]["error"]


def test_serial_run_stops_starting_tasks_when_the_time_budget_is_spent():
    ran = []
    tasks = [
        suite.Task("training", f"training {name} fast", lambda name=name: ran.append(name) or {"model": name}, row=True)
        for name in ("A", "B")
    ]
    parts, errors, _ = suite.run_tasks(tasks, time_budget_s=-1.0)
    assert ran == [] and parts == {}
    assert list(errors) == ["training A fast", "training B fast"]
    parts, errors, _ = suite.run_tasks(tasks, time_budget_s=None)
    assert ran == ["A", "B"] and errors == {} and parts == {"training": {"rows": [{"model": "A"}, {"model": "B"}]}}


def test_more_gpus_than_visible_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(suite.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(suite, "visible_gpus", lambda: ["0"])
    with pytest.raises(ValueError, match="--gpus 2: only 1 GPU"):
        suite.main(False, "unused", ["flops"], None, "python -m bench --gpus 2", gpus=2)
