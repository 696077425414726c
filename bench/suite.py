"""The benchmark suite: every measurement in one run, saved as JSON, a markdown report and PNG plots.

    python -m bench                  # every part (make bench)
    python -m bench --quick          # a short subset (make bench-quick)
    python -m bench --parts training sampling --models DiT-B/2 DiT-XL/2 --out-dir /tmp/bench
    python -m bench --render bench/results/<gpu>-<date>.json   # redraw the report and plots of a saved run

Parts, each stored under "parts" in the JSON; an exception in one is recorded under "errors" and the
suite goes on:
  flops       params, GMACs, GFLOPs of the paper's 16 configurations beside the paper's figure, and
              torch.utils.flop_counter's count of the real model (on fake tensors)
  kernels     bench.kernels.run: the fused ops against eager and compiled references, GB/s against copy
  attention   bench.attention.run: TFLOP/s of every attention backend
  training    bench.configs: training img/s, TFLOP/s, MFU, memory of the 12 configs, fast vs reference
  sampling    bench.configs: CFG sampling steps/s and 250-step img/s of the 12 configs, fast vs reference
  model       bench.model.run: DiT-XL/2 fwd+bwd and fwd with a kernel profile (not with --quick)
  train_step  bench.train_step.run at batch 256: train.py's step against the original recipe (not with --quick)
  scaling     FSDP weak scaling of DiT-XL/2, bench.train_step under torchrun on 1, 2, 4, 8 GPUs at 128
              images per GPU (with more than one GPU visible; not with --quick)
--quick: training (fast and eager reference) and sampling (bf16 eager and fast) of DiT-S/2 and DiT-XL/2 only,
batch 64, fewer timed steps, no Inductor compile of the references, and the quick subsets of kernels and
attention. The report lists the targets of BENCHMARKS.md and whether each
was met. Output: <out-dir>/<gpu>-<date>[-quick].json, .md and -<plot>.png; the exit status is 1 when a
part failed. Without CUDA the FLOP table is printed with a note that the timing parts need a GPU (exit 0).
"""

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from tqdm.auto import tqdm

from bench import attention, configs, kernels, plots, suite_merge, suite_parallel, train_step
from bench import model as model_bench
from bench.environment import environment, gpu_slug, matmul_peak_tflops, save_report, slug
from bench.flops import format_table
from bench.suite_records import error_record, time_budget_spent
from bench.suite_report import SCALING_BATCH, TRAIN_STEP_BATCH, markdown, targets
from dit_fast.config import get_config
from dit_fast.flops import FLOPS_PER_MAC, counted_forward_flops, flop_table

PARTS = ("flops", "kernels", "attention", "training", "sampling", "model", "train_step", "scaling")
FULL_ONLY_PARTS = ("model", "train_step", "scaling")
NO_GPU_NOTE = (
    "No CUDA GPU is visible: only the FLOP table above was computed. The timing parts ("
    + ", ".join(part for part in PARTS if part != "flops")
    + ") need a CUDA GPU: run `make bench` (or `python -m bench`) on a GPU machine."
)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALING_GPUS = (1, 2, 4, 8)
SCALING_STEPS = 15
SCALING_TIMEOUT_S = 900
SCALING_FIELDS = ("per_gpu_batch", "global_batch", "median_ms", "img_per_s", "mfu", "peak_mem_gib", "compile_s")
PER_CONFIG_PARTS = {  # part: (measure(model, variant, quick, peak TFLOP/s) -> row, variants, variants with --quick)
    "training": (configs.measure_training, configs.TRAIN_VARIANTS, configs.QUICK_TRAIN_VARIANTS),
    "sampling": (configs.measure_sampling, configs.SAMPLING_CONFIGS, configs.QUICK_SAMPLING_CONFIGS),
}
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class Task:
    """One measurement: measure() returns its part's whole report or, with row=True, one row of the part's table."""

    part: str
    label: str
    measure: Callable[[], dict]
    row: bool = False


def flop_rows(count_forward_flops: Callable = counted_forward_flops) -> list[dict]:
    """bench/flops.py's rows (analytic params, GMACs, GFLOPs, the paper's figure) plus the FLOP counter's count."""
    rows = flop_table()
    for row in tqdm(rows, desc="FLOP counter", leave=False):
        counted = count_forward_flops(get_config(row["model"], image_size=row["image_size"], block=row["block"]))
        row["counted_gmacs"] = counted / FLOPS_PER_MAC / 1e9
        row["counted_gflops"] = counted / 1e9
    return rows


def visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",") if visible else [str(index) for index in range(torch.cuda.device_count())]


def weak_scaling_run(gpus: int) -> dict:
    """bench.train_step's multi-GPU entry under torchrun on the first `gpus` GPUs: dit_fast only, SCALING_BATCH each."""
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "train_step.json")
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
            "-m", "bench.train_step", "--per-gpu-batch", str(SCALING_BATCH), "--only-dit-fast",
            "--steps", str(SCALING_STEPS), "--out", out,
        ]  # fmt: skip
        env = {**os.environ, **MULTICAST_OFF, "CUDA_VISIBLE_DEVICES": ",".join(visible_gpus()[:gpus])}
        done = subprocess.run(
            command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=SCALING_TIMEOUT_S
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"torchrun on {gpus} GPU(s) exited {done.returncode}: {(done.stdout + done.stderr)[-3000:]}"
            )
        with open(out) as f:
            result = json.load(f)["results"][0]
    return {"gpus": gpus, **{field: result[field] for field in SCALING_FIELDS}}


def part_tasks(part: str, quick: bool, models: list[str], gpu_count: int, peak_tflops: float) -> list[Task]:
    """The tasks of one part: one per (model, variant) for training and sampling, per GPU count for scaling."""
    if part in PER_CONFIG_PARTS:
        measure, variants, quick_variants = PER_CONFIG_PARTS[part]
        return [
            Task(part, f"{part} {name} {variant}", partial(measure, name, variant, quick, peak_tflops), row=True)
            for name in models
            for variant in (quick_variants if quick else variants)
        ]
    if part == "scaling":
        return [
            Task(part, f"scaling x{gpus}", partial(weak_scaling_run, gpus), row=True)
            for gpus in SCALING_GPUS
            if gpus <= gpu_count
        ]
    whole = {
        "flops": lambda: {"rows": flop_rows()},
        "kernels": partial(kernels.run, quick),
        "attention": partial(attention.run, quick),
        "model": partial(model_bench.run, quick),
        "train_step": partial(train_step.run, per_gpu_batches=[TRAIN_STEP_BATCH]),
    }
    return [Task(part, part, whole[part])]


def plan(
    quick: bool, parts: list[str], models: list[str] | None, gpu_count: int, peak_tflops: float
) -> tuple[list[Task], dict[str, str]]:
    """The tasks to run, in PARTS order, and why each part left out is left out."""
    models = list(models or (configs.QUICK_MODELS if quick else configs.PAPER_MODELS))
    tasks, skipped = [], {}
    for part in PARTS:
        if part not in parts:
            skipped[part] = "not selected (--parts)"
        elif quick and part in FULL_ONLY_PARTS:
            skipped[part] = "not in --quick"
        elif part == "scaling" and gpu_count < 2:
            skipped[part] = f"needs >1 GPU ({gpu_count} visible)"
        else:
            tasks += part_tasks(part, quick, models, gpu_count, peak_tflops)
    return tasks, skipped


def release_memory() -> None:
    """Drop compiled graphs (they hold their models), then the objects and cached blocks of the last task."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_task(task: Task) -> dict:
    """Run one task: a record of its part, label, seconds and result, or of its error (the suite goes on)."""
    record = {"part": task.part, "label": task.label, "row": task.row}
    began = time.perf_counter()
    try:
        record["result"] = task.measure()
    except Exception as error:  # one part failing must not end the suite: record it and go on
        record["error"] = {"part": task.part, "error": repr(error), "traceback": traceback.format_exc(limit=-8)}
        tqdm.write(f"{task.label} failed: {error!r}")
    record["seconds"] = time.perf_counter() - began
    release_memory()
    return record


def collect(records: list[dict]) -> tuple[dict, dict, dict]:
    """(results by part, errors by task label, seconds by part) of task records, in the records' order."""
    parts, errors, seconds = {}, {}, {}
    for record in records:
        part = record["part"]
        if "error" in record:
            errors[record["label"]] = record["error"]
        elif record["row"]:
            parts.setdefault(part, {"rows": []})["rows"].append(record["result"])
        else:
            parts[part] = record["result"]
        seconds[part] = round(seconds.get(part, 0.0) + record["seconds"], 1)
    return parts, errors, seconds


def run_tasks(tasks: list[Task], time_budget_s: float | None = None) -> tuple[dict, dict, dict]:
    """Run every task under a progress bar; with a time budget (s), start none after it is spent."""
    began, records = time.perf_counter(), []
    progress = tqdm(tasks, desc="bench", unit="task", dynamic_ncols=True)
    for task in progress:
        if time_budget_s is not None and time.perf_counter() - began > time_budget_s:
            records.append(error_record(task, time_budget_spent(time_budget_s)))
            continue
        progress.set_description(task.label)
        records.append(run_task(task))
    return collect(records)


def use_tf32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = True  # as DiT's train.py and bench/model.py
    torch.backends.cudnn.allow_tf32 = True


def run_suite(
    quick: bool, parts: list[str], models: list[str] | None, command: str, gpus: int = 1,
    time_budget_s: float | None = None,
) -> dict:  # fmt: skip
    """Measure every selected part on this machine's GPUs; returns the JSON-ready report.

    gpus > 1 spreads the tasks (all but scaling's) over that many GPUs, one worker process each
    (bench/suite_parallel.py); scaling then runs alone, on every visible GPU.
    """
    use_tf32()
    began, env = time.perf_counter(), environment()
    peak_tflops = matmul_peak_tflops()
    tasks, skipped = plan(quick, parts, models, torch.cuda.device_count(), peak_tflops)
    if gpus > 1:
        release_memory()  # the peak measurement's cached blocks on GPU 0, which a worker uses
        selection = {"quick": quick, "parts": parts, "models": models, "peak_tflops": peak_tflops}
        records = suite_parallel.run_on_gpus(tasks, selection, visible_gpus()[:gpus], time_budget_s)
        rest = [task for task in tasks if task.part == "scaling"]
        results, errors, seconds = collect(records + [run_task(task) for task in tqdm(rest, desc="scaling")])
    else:
        results, errors, seconds = run_tasks(tasks, time_budget_s)
    return {
        "benchmark": "suite", "quick": quick, "command": command, "env": env, "gpus_in_parallel": gpus,
        "bf16_matmul_peak_tflops": round(peak_tflops, 1), "parts": results, "skipped": skipped, "errors": errors,
        "seconds": seconds, "total_s": round(time.perf_counter() - began, 1),
    }  # fmt: skip


def write_outputs(report: dict, prefix: str) -> list[str]:
    """<prefix>.json, <prefix>.md and <prefix>-<plot>.png from a report; returns their paths.

    The report goes through JSON first, so a fresh run and a saved file are rendered alike.
    """
    report = json.loads(json.dumps(report))
    report["targets"] = targets(report)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    plot_paths, plot_errors = plots.write_plots(report, prefix)
    report["errors"].update(plot_errors)
    report["plots"] = [os.path.basename(path) for path in plot_paths]
    json_path = save_report(report, "suite", out=prefix + ".json")
    with open(prefix + ".md", "w") as f:
        f.write(markdown(report))
    return [json_path, prefix + ".md", *plot_paths]


def render_saved(path: str) -> list[str]:
    """Redraw the report and plots of a saved suite JSON beside it."""
    with open(path) as f:
        report = json.load(f)
    return write_outputs(report, path.removesuffix(".json"))


def merge_saved(paths: list[str], out_dir: str) -> list[str]:
    """Merge saved suite runs (bench/suite_merge.py) into <out_dir>/<gpu>-<first run's date>[-quick] outputs."""
    reports = []
    for path in paths:
        with open(path) as f:
            reports.append(json.load(f))
    report = suite_merge.merge(reports, paths)
    name = f"{slug(report['env'].get('gpu', 'cpu'))}-{report['env']['date'][:10]}{'-quick' if report['quick'] else ''}"
    return write_outputs(report, os.path.join(out_dir, name))


def main(
    quick: bool, out_dir: str, parts: list[str], models: list[str] | None, command: str, gpus: int = 1,
    time_budget_s: float | None = None,
) -> int:  # fmt: skip
    """Run the suite and write its outputs; without CUDA, print the FLOP table and what needs a GPU (exit 0)."""
    if not torch.cuda.is_available():
        print(format_table(flop_rows()))
        print("\n" + NO_GPU_NOTE)
        return 0
    if gpus > len(visible_gpus()):
        raise ValueError(f"--gpus {gpus}: only {len(visible_gpus())} GPU(s) are visible here")
    report = run_suite(quick, parts, models, command, gpus, time_budget_s)
    prefix = os.path.join(out_dir, f"{gpu_slug()}-{report['env']['date'][:10]}{'-quick' if quick else ''}")
    for path in write_outputs(report, prefix):
        print("wrote", path)
    if report["errors"]:
        print("failed parts:", ", ".join(report["errors"]))
    return 1 if report["errors"] else 0
