"""The suite's report: the targets of BENCHMARKS.md against a run, and the markdown of the whole report."""

from bench import attention, configs, kernels, train_step
from bench import model as model_bench
from bench.sampling import TARGETS as SAMPLING_TARGETS
from bench.suite_merge import run_summaries

TRAIN_STEP_BATCH = 256  # the batch of the training targets
SCALING_BATCH = 128  # per GPU
# Targets of the earlier issues as BENCHMARKS.md lists them; sampling's and training's come from their benches.
BANDWIDTH_TARGET_OPS = ("ln_modulate", "gated_residual_ln_modulate")
SPEEDUP_TARGET_OPS = BANDWIDTH_TARGET_OPS + ("gated_residual", "final_layer")  # the kernel issue's four ops
KERNEL_FWD_PCT_OF_COPY = 85.0
KERNEL_FWD_BWD_SPEEDUP = 1.2
FINAL_LAYER_FWD_BWD_SPEEDUP = 1.5
MODEL_FWD_BWD_SPEEDUP_256 = 1.25
MODEL_FWD_SPEEDUP_128 = 1.2


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
        target(f"{op} fwd+bwd >= {KERNEL_FWD_BWD_SPEEDUP}x compiled (Inductor)", "kernels",
               speedups(op), KERNEL_FWD_BWD_SPEEDUP, "x")
        for op in SPEEDUP_TARGET_OPS
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
    ours = [r["img_per_s"] for r in at_batch if r["impl"] == "dit_fast" and r["finite_check"] in ("device", True)]
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


def run_lines(report: dict) -> list[str]:
    """One line per run: a merged report (bench/suite_merge.py) lists each of its slices."""
    runs = run_summaries(report)
    lines = [f"- merged from {len(runs)} runs: `{report['command']}`"] if "runs" in report else []
    for run in runs:
        spread = f", tasks spread over {run['gpus_in_parallel']} GPUs" if run["gpus_in_parallel"] > 1 else ""
        lines.append(
            f"- command: `{run['command']}`: commit {run['commit']}, {run['date']}, {run['total_s']:.0f} s on "
            f"{run['gpu_count']} visible GPU(s){spread}, bf16 matmul (8192^3) {run['bf16_matmul_peak_tflops']} TFLOP/s"
        )
    return lines


def header_markdown(report: dict) -> list[str]:
    env = report["env"]
    copy = (report["parts"].get("kernels") or {}).get("copy_bandwidth_GBps")
    per_part = ", ".join(f"{part} {seconds:.0f} s" for part, seconds in report["seconds"].items())
    return [
        f"# dit_fast benchmark suite: {env.get('gpu', '?')}, {env['date'][:10]}"
        f"{' (--quick)' if report['quick'] else ''}",
        "",
        *run_lines(report),
        f"- hardware: {env.get('gpu', '?')} x {env.get('gpu_count', '?')} ({env.get('sms', '?')} SMs)",
        f"- software: Python {env['python']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
        f"cuDNN {env['cudnn']}",
        f"- device copy bandwidth: {f'{copy:.0f} GB/s' if copy else 'not measured'} (kernels part); MFU is against "
        "the bf16 matmul rate of the row's own run",
        f"- time: {report['total_s']:.0f} s in all; per part, summed over GPUs: {per_part}",
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
