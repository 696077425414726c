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
--quick: training and sampling of DiT-S/2, DiT-B/2 and DiT-XL/2 only, batch 64, fewer timed steps, and the
quick subsets of kernels and attention. The report lists the targets of BENCHMARKS.md and whether each
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

from bench import attention, configs, kernels, plots, train_step
from bench import model as model_bench
from bench.environment import environment, gpu_slug, matmul_peak_tflops, save_report
from bench.flops import format_table
from bench.sampling import TARGETS as SAMPLING_TARGETS
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
TRAIN_STEP_BATCH = 256  # the batch of the training targets
SCALING_GPUS = (1, 2, 4, 8)
SCALING_BATCH = 128  # per GPU
SCALING_STEPS = 15
SCALING_TIMEOUT_S = 900
SCALING_FIELDS = ("per_gpu_batch", "global_batch", "median_ms", "img_per_s", "mfu", "peak_mem_gib", "compile_s")
PER_CONFIG_PARTS = {  # part: (measure(model, variant, quick, peak TFLOP/s) -> row, variants)
    "training": (configs.measure_training, configs.TRAIN_VARIANTS),
    "sampling": (configs.measure_sampling, configs.SAMPLING_CONFIGS),
}
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# Targets of the earlier issues as BENCHMARKS.md lists them; sampling's and training's come from their benches.
BANDWIDTH_TARGET_OPS = ("ln_modulate", "gated_residual_ln_modulate")
KERNEL_FWD_PCT_OF_COPY = 85.0
KERNEL_FWD_BWD_SPEEDUP = 1.2
FINAL_LAYER_FWD_BWD_SPEEDUP = 1.5
MODEL_FWD_BWD_SPEEDUP_256 = 1.25
MODEL_FWD_SPEEDUP_128 = 1.2


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
        measure, variants = PER_CONFIG_PARTS[part]
        return [
            Task(part, f"{part} {name} {variant}", partial(measure, name, variant, quick, peak_tflops), row=True)
            for name in models
            for variant in variants
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


def run_tasks(tasks: list[Task]) -> tuple[dict, dict, dict]:
    """Run every task under a progress bar: (results by part, errors by task label, seconds by part)."""
    parts, errors, seconds = {}, {}, {}
    progress = tqdm(tasks, desc="bench", unit="task", dynamic_ncols=True)
    for task in progress:
        progress.set_description(task.label)
        began = time.perf_counter()
        try:
            result = task.measure()
        except Exception as error:  # one part failing must not end the suite: record it and go on
            errors[task.label] = {"part": task.part, "error": repr(error), "traceback": traceback.format_exc(limit=-8)}
            tqdm.write(f"{task.label} failed: {error!r}")
        else:
            if task.row:
                parts.setdefault(task.part, {"rows": []})["rows"].append(result)
            else:
                parts[task.part] = result
        seconds[task.part] = round(seconds.get(task.part, 0.0) + time.perf_counter() - began, 1)
        release_memory()
    return parts, errors, seconds


def run_suite(quick: bool, parts: list[str], models: list[str] | None, command: str) -> dict:
    """Measure every selected part on this machine's GPUs; returns the JSON-ready report."""
    torch.backends.cuda.matmul.allow_tf32 = True  # as DiT's train.py and bench/model.py
    torch.backends.cudnn.allow_tf32 = True
    began, env = time.perf_counter(), environment()
    peak_tflops = matmul_peak_tflops()
    tasks, skipped = plan(quick, parts, models, torch.cuda.device_count(), peak_tflops)
    results, errors, seconds = run_tasks(tasks)
    return {
        "benchmark": "suite", "quick": quick, "command": command, "env": env,
        "bf16_matmul_peak_tflops": round(peak_tflops, 1), "parts": results, "skipped": skipped, "errors": errors,
        "seconds": seconds, "total_s": round(time.perf_counter() - began, 1),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------------------


def target(text: str, part: str, values: list[float], goal: float, unit: str, at_most: bool = False) -> dict:
    """One target: the measured range (several shapes give several values) and whether the worst meets the goal."""
    if not values:
        return {"target": text, "part": part, "goal": goal, "unit": unit, "measured": None, "met": None}
    worst = max(values) if at_most else min(values)
    met = worst <= goal if at_most else worst >= goal
    return {
        "target": text,
        "part": part,
        "goal": goal,
        "unit": unit,
        "measured": [min(values), max(values)],
        "met": met,
    }


def kernel_targets(report: dict | None) -> list[dict]:
    rows = report["results"] if report else []
    ms = {(r["op"], r["B"], r["T"], r["pass"], r["impl"]): r["ms"] for r in rows}

    def triton_rows(op: str, mode: str) -> list[dict]:
        return [r for r in rows if r["op"] == op and r["pass"] == mode and r["impl"] == "triton"]

    def speedups(op: str) -> list[float]:
        return [ms[(op, r["B"], r["T"], "fwd+bwd", "compiled")] / r["ms"] for r in triton_rows(op, "fwd+bwd")]

    found = [
        target(f"{op} fwd >= {KERNEL_FWD_PCT_OF_COPY:.0f}% of copy bandwidth", "kernels",
               [100 * r["fraction_of_copy_bandwidth"] for r in triton_rows(op, "fwd")], KERNEL_FWD_PCT_OF_COPY, "%")
        for op in BANDWIDTH_TARGET_OPS
    ]  # fmt: skip
    found += [
        target(f"{case.name} fwd+bwd >= {KERNEL_FWD_BWD_SPEEDUP}x compiled (Inductor)", "kernels",
               speedups(case.name), KERNEL_FWD_BWD_SPEEDUP, "x")
        for case in kernels.OP_CASES
    ]  # fmt: skip
    found.append(
        target(f"final_layer fwd+bwd >= {FINAL_LAYER_FWD_BWD_SPEEDUP}x compiled reference", "kernels",
               speedups("final_layer"), FINAL_LAYER_FWD_BWD_SPEEDUP, "x")
    )  # fmt: skip
    return found


def model_targets(report: dict | None) -> list[dict]:
    speedups = report["speedups"] if report else {}

    def vs_compiled(key: str) -> list[float]:
        return [speedups[key]["vs_compiled"]] if key in speedups else []

    return [
        target(f"DiT-XL/2 fwd+bwd >= {MODEL_FWD_BWD_SPEEDUP_256}x compiled reference at batch 256", "model",
               vs_compiled("fwd+bwd@256"), MODEL_FWD_BWD_SPEEDUP_256, "x"),
        target(f"DiT-XL/2 fwd >= {MODEL_FWD_SPEEDUP_128}x compiled reference at batch 128", "model",
               vs_compiled("fwd@128"), MODEL_FWD_SPEEDUP_128, "x"),
    ]  # fmt: skip


def sampling_targets(part: dict | None) -> list[dict]:
    step_ms = {r["config"]: r["step_ms"] for r in (part or {"rows": []})["rows"] if r["model"] == "DiT-XL/2"}
    fast = step_ms.get("fast")

    def over_fast(baseline: str) -> list[float]:
        return [step_ms[baseline] / fast] if fast and baseline in step_ms else []

    return [
        target(f"DiT-XL/2 CFG sampling step at batch 64 <= {SAMPLING_TARGETS['step_ms']} ms", "sampling",
               [fast] if fast else [], SAMPLING_TARGETS["step_ms"], "ms", at_most=True),
        target(f"DiT-XL/2 sampling >= {SAMPLING_TARGETS['speedup_vs_compiled']}x compiled reference", "sampling",
               over_fast("bf16+compile"), SAMPLING_TARGETS["speedup_vs_compiled"], "x"),
        target(f"DiT-XL/2 sampling >= {SAMPLING_TARGETS['speedup_vs_fp32']}x the fp32 recipe", "sampling",
               over_fast("fp32+tf32"), SAMPLING_TARGETS["speedup_vs_fp32"], "x"),
    ]  # fmt: skip


def training_targets(report: dict | None) -> list[dict]:
    at_batch = [r for r in (report or {"results": []})["results"] if r["per_gpu_batch"] == TRAIN_STEP_BATCH]
    ours = [r["img_per_s"] for r in at_batch if r["impl"] == "dit_fast" and r["finite_check"]]
    original = [r["img_per_s"] for r in at_batch if r["impl"] == "original"]
    return [
        target(f"DiT-XL/2 training step >= {train_step.TARGET_IMG_PER_S} img/s at batch {TRAIN_STEP_BATCH}",
               "train_step", ours, train_step.TARGET_IMG_PER_S, "img/s"),
        target(f"DiT-XL/2 training step >= {train_step.TARGET_SPEEDUP}x the original recipe", "train_step",
               [ours[0] / original[0]] if ours and original else [], train_step.TARGET_SPEEDUP, "x"),
    ]  # fmt: skip


def scaling_targets(part: dict | None) -> list[dict]:
    goal = train_step.TARGET_WEAK_SCALING
    efficiency = scaling_efficiency(part["rows"]) if part else {}
    if len(efficiency) < 2:
        return [target(f"FSDP weak scaling efficiency >= {goal}", "scaling", [], goal, "")]
    return [
        target(f"FSDP weak scaling efficiency on {gpus} GPUs >= {goal}", "scaling", [value], goal, "")
        for gpus, value in efficiency.items()
        if gpus > 1
    ]


def targets(report: dict) -> list[dict]:
    """Every target of BENCHMARKS.md against this run; measured None where its part did not run or failed."""
    parts = report["parts"]
    return [
        *kernel_targets(parts.get("kernels")),
        *model_targets(parts.get("model")),
        *sampling_targets(parts.get("sampling")),
        *training_targets(parts.get("train_step")),
        *scaling_targets(parts.get("scaling")),
    ]


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


def scaling_efficiency(rows: list[dict]) -> dict[int, float]:
    """img/s on N GPUs over N x img/s on one, per N (empty without the one-GPU run)."""
    single = next((r["img_per_s"] for r in rows if r["gpus"] == 1), None)
    return {r["gpus"]: r["img_per_s"] / (r["gpus"] * single) for r in rows} if single else {}


def scaling_markdown(part: dict) -> str:
    efficiency = scaling_efficiency(part["rows"])
    lines = [
        f"DiT-XL/2 256px, bench/train_step.py under torchrun, dit_fast step, {SCALING_BATCH} images per GPU; "
        "efficiency = img/s(N) / (N x img/s(1)).",
        "",
        "| GPUs | batch/GPU | global batch | ms/step | img/s | MFU | peak GiB | compile s | efficiency |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in part["rows"]:
        share = f"{efficiency[r['gpus']]:.3f}" if r["gpus"] in efficiency else "-"
        lines.append(
            f"| {r['gpus']} | {r['per_gpu_batch']} | {r['global_batch']} | {r['median_ms']} | {r['img_per_s']} | "
            f"{r['mfu']:.1%} | {r['peak_mem_gib']} | {r['compile_s']} | {share} |"
        )
    return "\n".join(lines)


def flops_markdown(part: dict) -> str:
    lines = [
        'Forward pass of one image. The paper\'s "Gflops" are multiply-accumulates (GMACs); GFLOPs = 2 x GMACs. '
        "Counted: torch.utils.flop_counter on the reference model (math attention, fake tensors).",
        "",
        "| model | block | px | params | GMACs | GFLOPs | counted GFLOPs | paper GMACs | diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in part["rows"]:
        lines.append(
            f"| {r['model']} | {r['block']} | {r['image_size']} | {r['params']:,} | {r['gmacs']:.3f} | "
            f"{r['gflops']:.3f} | {r['counted_gflops']:.3f} | {r['paper_gmacs']} | {r['diff_pct']:+.2f}% |"
        )
    return "\n".join(lines)


def measured_text(found: dict) -> str:
    low, high = found["measured"]
    unit = found["unit"]
    digits = 0 if unit == "%" else 1 if unit in ("ms", "img/s") else 3 if unit == "" else 2
    span = f"{low:.{digits}f}" if round(low, digits) == round(high, digits) else f"{low:.{digits}f}-{high:.{digits}f}"
    return span + ("" if unit in ("", "x", "%") else " ") + unit


def why_absent(report: dict, part: str) -> str:
    if part in report["skipped"]:
        return f"not measured: {report['skipped'][part]}"
    failed = [label for label, error in report["errors"].items() if error["part"] == part]
    return f"not measured: {', '.join(failed)} failed" if failed else "not measured"


def targets_markdown(report: dict) -> str:
    lines = ["| target | part | measured | met |", "|---|---|---|---|"]
    for found in report["targets"]:
        if found["measured"] is None:
            lines.append(f"| {found['target']} | {found['part']} | {why_absent(report, found['part'])} | - |")
        else:
            met = "yes" if found["met"] else "**no**"
            lines.append(f"| {found['target']} | {found['part']} | {measured_text(found)} | {met} |")
    return "\n".join(lines)


SECTIONS = (  # part, title, markdown of the part's results
    ("flops", "FLOPs: analytic, counted and the paper's", flops_markdown),
    ("training", "Training throughput of the 12 configs (bench/configs.py)", configs.training_markdown),
    ("sampling", "Sampling throughput of the 12 configs (bench/configs.py)", configs.sampling_markdown),
    ("kernels", "Kernels (bench/kernels.py)", kernels.markdown_table),
    ("attention", "Attention backends (bench/attention.py)", attention.markdown_tables),
    ("model", "DiT-XL/2 forward+backward and forward (bench/model.py)", model_bench.markdown),
    ("train_step", "DiT-XL/2 training step (bench/train_step.py)", train_step.markdown),
    ("scaling", "FSDP weak scaling (bench/train_step.py under torchrun)", scaling_markdown),
)


def header_markdown(report: dict) -> list[str]:
    env = report["env"]
    copy = (report["parts"].get("kernels") or {}).get("copy_bandwidth_GBps")
    per_part = ", ".join(f"{part} {seconds:.0f} s" for part, seconds in report["seconds"].items())
    return [
        f"# dit_fast benchmark suite: {env.get('gpu', '?')}, {env['date'][:10]}"
        f"{' (--quick)' if report['quick'] else ''}",
        "",
        f"- command: `{report['command']}`",
        f"- commit: {env['commit']}, {env['date']}",
        f"- hardware: {env.get('gpu', '?')} x {env.get('gpu_count', '?')} ({env.get('sms', '?')} SMs)",
        f"- software: Python {env['python']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
        f"cuDNN {env['cudnn']}",
        f"- ceilings measured in this run: bf16 matmul (8192^3) {report['bf16_matmul_peak_tflops']} TFLOP/s; "
        f"device copy {f'{copy:.0f} GB/s' if copy else 'not measured'} (kernels part)",
        f"- wall time: {report['total_s']:.0f} s ({per_part})",
    ]


def markdown(report: dict) -> str:
    """The whole report: header, targets, each part's tables (or why it is missing), plots, errors."""
    lines = [*header_markdown(report), "", "## Targets (BENCHMARKS.md)", "", targets_markdown(report)]
    for part, title, render in SECTIONS:
        lines += ["", f"## {title}", ""]
        if part not in report["parts"]:
            lines.append(why_absent(report, part))
            continue
        try:
            lines.append(render(report["parts"][part]))
        except Exception as error:  # a part's results of an unexpected shape must not lose the rest of the report
            lines.append(f"could not render these results: {error!r}")
    if report.get("plots"):
        lines += ["", "## Plots"]
        for name in report["plots"]:
            lines += ["", f"![{name}]({name})"]
    if report["errors"]:
        lines += ["", "## Errors", ""]
        lines += [f"- {label} ({error['part']}): `{error['error']}`" for label, error in report["errors"].items()]
    return "\n".join(lines) + "\n"


def write_outputs(report: dict, prefix: str) -> list[str]:
    """<prefix>.json, <prefix>.md and <prefix>-<plot>.png from a report; returns their paths.

    The report goes through JSON first, so a fresh run and a saved file are rendered alike.
    """
    report = json.loads(json.dumps(report))
    report["targets"] = targets(report)
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


def main(quick: bool, out_dir: str, parts: list[str], models: list[str] | None, command: str) -> int:
    """Run the suite and write its outputs; without CUDA, print the FLOP table and what needs a GPU (exit 0)."""
    if not torch.cuda.is_available():
        print(format_table(flop_rows()))
        print("\n" + NO_GPU_NOTE)
        return 0
    report = run_suite(quick, parts, models, command)
    prefix = os.path.join(out_dir, f"{gpu_slug()}-{report['env']['date'][:10]}{'-quick' if quick else ''}")
    for path in write_outputs(report, prefix):
        print("wrote", path)
    if report["errors"]:
        print("failed parts:", ", ".join(report["errors"]))
    return 1 if report["errors"] else 0
