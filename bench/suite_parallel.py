"""The suite spread over several GPUs of one machine (`python -m bench --gpus N`).

One worker process per GPU, started as `python -m bench.suite_parallel SPEC CLAIMS RECORDS` with
CUDA_VISIBLE_DEVICES set to that GPU. Every worker builds the same task list as the parent (the spec names the
selection and the labels the parent expects) and walks it in order, running each task it claims: a claim is a
file created with O_EXCL in the shared claims folder, so each task runs once, on whichever GPU is free first.
The longest single tasks go first, so that they do not end the run alone. A worker appends one JSON line per
finished task to its records file, which the parent reads back; a task claimed by a worker that died, or left
unstarted when the time budget was spent, gets an error record. Scaling needs every GPU and is not spread.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from bench.suite_records import error_record, time_budget_spent

LONGEST_FIRST = ("model", "train_step")  # one task each, 4-5 minutes on an H200
POLL_S = 2.0
LOG_TAIL_CHARS = 3000


def spread_order(tasks: list) -> list:
    """The tasks the workers share (all but scaling), the longest first, otherwise in plan order."""
    shared = [task for task in tasks if task.part != "scaling"]
    return sorted(shared, key=lambda task: task.part not in LONGEST_FIRST)


def claim(claims_dir: str, index: int) -> bool:
    """True for the one worker that creates the task's claim file first."""
    try:
        os.close(os.open(os.path.join(claims_dir, f"{index}.claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def worker_main(spec_json: str, claims_dir: str, records_path: str) -> None:
    """A worker's loop: claim the next unclaimed task, run it, append its record, until none is left."""
    from bench import suite  # here, not at the top: bench.suite imports this module

    spec = json.loads(spec_json)
    suite.use_tf32()
    tasks, _ = suite.plan(spec["quick"], spec["parts"], spec["models"], gpu_count=1, peak_tflops=spec["peak_tflops"])
    order = spread_order(tasks)
    labels = [task.label for task in order]
    if labels != spec["labels"]:
        raise RuntimeError(f"this worker's task list differs from the parent's: {labels} against {spec['labels']}")
    with open(records_path, "a") as records:
        for index, task in enumerate(order):
            if time.time() > spec["deadline"]:
                return
            if claim(claims_dir, index):
                record = {"index": index, "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), **suite.run_task(task)}
                records.write(json.dumps(record) + "\n")
                records.flush()


def read_records(paths: list[str]) -> list[dict]:
    records = []
    for path in paths:
        if os.path.exists(path):
            with open(path) as f:
                finished_lines = f.read().split("\n")[:-1]  # a line still being written has no newline yet
            records += [json.loads(line) for line in finished_lines]
    return records


def missing_record(task, claimed: bool, logs: str, time_budget_s: float | None) -> dict:
    """The error record of a task that has no record: its worker died during it, or nobody started it."""
    if claimed:
        return error_record(task, f"the worker running this task exited before it finished; worker logs end with:\n{logs}")
    if time_budget_s is not None:
        return error_record(task, time_budget_spent(time_budget_s))
    return error_record(task, f"not run: every worker exited before it started; worker logs end with:\n{logs}")


def run_on_gpus(tasks: list, selection: dict, gpus: list[str], time_budget_s: float | None = None) -> list[dict]:
    """Run the shared tasks of `tasks` (as suite.plan made them from `selection`) on `gpus`, one worker per GPU.

    Returns one record per task (suite.run_task's form), in spread_order.
    """
    order = spread_order(tasks)
    deadline = time.time() + time_budget_s if time_budget_s is not None else float("inf")
    spec = json.dumps({**selection, "labels": [task.label for task in order], "deadline": deadline})
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as scratch:
        record_paths = [os.path.join(scratch, f"records-{worker}.jsonl") for worker in range(len(gpus))]
        log_paths = [os.path.join(scratch, f"worker-{worker}.log") for worker in range(len(gpus))]
        workers = []
        for gpu, records, log in zip(gpus, record_paths, log_paths):
            command = [sys.executable, "-m", "bench.suite_parallel", spec, scratch, records]
            with open(log, "w") as log_file:
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
                workers.append(subprocess.Popen(command, cwd=repo_root, env=env, stdout=log_file, stderr=log_file))
        with tqdm(total=len(order), desc=f"bench on {len(gpus)} GPUs", unit="task", dynamic_ncols=True) as progress:
            while any(worker.poll() is None for worker in workers):
                time.sleep(POLL_S)
                progress.update(len(read_records(record_paths)) - progress.n)
        by_index = {record.pop("index"): record for record in read_records(record_paths)}
        logs = "\n".join(Path(log).read_text()[-LOG_TAIL_CHARS:] for log in log_paths)
        claimed = {int(name.removesuffix(".claim")) for name in os.listdir(scratch) if name.endswith(".claim")}
    return [
        by_index.get(index) or missing_record(task, index in claimed, logs, time_budget_s)
        for index, task in enumerate(order)
    ]


if __name__ == "__main__":
    worker_main(*sys.argv[1:])
