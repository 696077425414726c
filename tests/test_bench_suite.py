"""The benchmark suite on the CPU: the FLOP table's assembly, the plan of tasks, error recording, the report and
plots from a saved results file, and `python -m bench` without CUDA."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import plots as plots_module
from bench import suite, suite_report
from bench.configs import (
    PAPER_MODELS,
    QUICK_MODELS,
    QUICK_SAMPLING_CONFIGS,
    QUICK_TRAIN_VARIANTS,
    SAMPLING_CONFIGS,
    TRAIN_VARIANTS,
)
from dit_fast.flops import PAPER_GMACS, forward_macs

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMITTED = REPO_ROOT / "bench" / "results"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def analytic_count(cfg) -> int:
    """A stand-in for the FLOP counter (which takes about a second a model): 2 FLOPs per analytic MAC."""
    return 2 * forward_macs(cfg)


def test_flop_rows_cover_the_papers_configs_with_counted_flops():
    counted_configs = []

    def count(cfg):
        counted_configs.append((cfg.name, cfg.block, cfg.input_size * 8))
        return analytic_count(cfg)

    rows = suite.flop_rows(count)
    assert [(r["model"], r["block"], r["image_size"]) for r in rows] == list(PAPER_GMACS) == counted_configs
    assert {r["model"] for r in rows if r["image_size"] == 256 and r["block"] == "adaLN-Zero"} == set(PAPER_MODELS)
    assert {r["block"] for r in rows if r["model"] == "DiT-XL/2" and r["image_size"] == 256} == {
        "adaLN-Zero", "adaLN", "cross-attention", "in-context",
    }  # fmt: skip
    assert ("DiT-XL/2", "adaLN-Zero", 512) in counted_configs
    for row in rows:
        assert row["counted_gflops"] == pytest.approx(row["gflops"]) == pytest.approx(2 * row["counted_gmacs"])
        assert row["paper_gmacs"] == PAPER_GMACS[(row["model"], row["block"], row["image_size"])]
    table = suite_report.flops_markdown({"rows": rows})
    assert table.count("\n| DiT-") == len(PAPER_GMACS)


def test_quick_plan_is_the_quick_models_and_no_full_only_parts():
    tasks, skipped = suite.plan(True, list(suite.PARTS), None, gpu_count=1, peak_tflops=700.0)
    training = [t.label for t in tasks if t.part == "training"]
    assert training == [f"training {m} {v}" for m in QUICK_MODELS for v in QUICK_TRAIN_VARIANTS]
    assert len([t for t in tasks if t.part == "sampling"]) == len(QUICK_MODELS) * len(QUICK_SAMPLING_CONFIGS)
    assert [t.part for t in tasks if not t.row] == ["flops", "kernels", "attention"]
    assert skipped == {part: "not in --quick" for part in suite.FULL_ONLY_PARTS}


def test_full_plan_covers_the_12_configs_and_scales_with_the_gpus():
    tasks, skipped = suite.plan(False, list(suite.PARTS), None, gpu_count=1, peak_tflops=700.0)
    assert len([t for t in tasks if t.part == "training"]) == 12 * len(TRAIN_VARIANTS)
    assert {t.part for t in tasks} == set(suite.PARTS) - {"scaling"}
    assert skipped == {"scaling": "needs >1 GPU (1 visible)"}
    tasks, skipped = suite.plan(False, ["scaling", "flops"], ["DiT-B/4"], gpu_count=4, peak_tflops=700.0)
    assert [t.label for t in tasks] == ["flops", "scaling x1", "scaling x2", "scaling x4"]
    assert skipped["training"] == "not selected (--parts)"


def test_a_failing_task_is_recorded_and_the_suite_goes_on():
    def fail():
        raise RuntimeError("out of luck")

    tasks = [
        suite.Task("training", "training A fast", lambda: {"model": "A"}, row=True),
        suite.Task("training", "training B fast", fail, row=True),
        suite.Task("kernels", "kernels", lambda: {"benchmark": "kernels"}),
    ]
    parts, errors, seconds = suite.run_tasks(tasks)
    assert parts == {"training": {"rows": [{"model": "A"}]}, "kernels": {"benchmark": "kernels"}}
    assert list(errors) == ["training B fast"]
    assert errors["training B fast"]["part"] == "training"
    assert errors["training B fast"]["error"] == "RuntimeError('out of luck')"
    assert "out of luck" in errors["training B fast"]["traceback"]
    assert set(seconds) == {"training", "kernels"}


FAKE_MODELS = ("DiT-S/2", "DiT-B/2", "DiT-XL/2")  # the saved results' models: GFLOPs 10, 100, 1000


def training_rows() -> list[dict]:
    img_per_s = {"fast": 700.0, "reference-compiled": 650.0, "reference-eager": 450.0}
    rows = []
    for scale, model in enumerate(FAKE_MODELS, start=1):
        for variant in TRAIN_VARIANTS:
            rows.append({
                "model": model, "variant": variant, "forward_gflops_per_image": 10.0**scale, "batch": 64,
                "ms": 90.0, "img_per_s": round(img_per_s[variant] * 10 / scale, 1), "tflops": 300.0, "mfu": 0.4,
                "peak_mem_gib": 20.0, "first_step_s": 30.0, "out_of_memory_at": [],
            })  # fmt: skip
    return rows


def sampling_rows() -> list[dict]:
    step_ms = {"fp32+tf32": 192.0, "bf16": 116.0, "bf16+compile": 63.6, "fast": 59.6}
    rows = []
    for scale, model in enumerate(FAKE_MODELS, start=1):
        for config in SAMPLING_CONFIGS:
            ms = round(step_ms[config] * scale / 3, 2)
            rows.append({
                "model": model, "forward_gflops_per_image": 10.0**scale, "config": config, "step_ms": ms,
                "img_per_s_250_steps": round(64 / (ms * 0.25), 2), "tflops": 400.0, "mfu": 0.5, "setup_s": 5.0,
                "peak_mem_gib": 8.0, "cfg_steps_per_s": round(1000 / ms, 2),
            })  # fmt: skip
    return rows


def train_step_report() -> dict:
    rows = [("dit_fast", "device", 670.9), ("dit_fast", "host", 660.2), ("original", "none", 576.0)]
    return {
        "benchmark": "train_step", "model": "DiT-XL/2", "image_size": 256, "env": {"gpu": "NVIDIA H200"},
        "world_size": 1, "bf16_matmul_peak_tflops": 750.0, "summary": {},
        "results": [
            {"impl": impl, "per_gpu_batch": 256, "global_batch": 256, "world_size": 1, "finite_check": check,
             "median_ms": round(256 / img_per_s * 1000, 2), "img_per_s": img_per_s, "tflops_per_gpu": 470.0,
             "mfu": 0.62, "peak_mem_gib": 80.0, "compile_s": 40.0}
            for impl, check, img_per_s in rows
        ],
    }  # fmt: skip


def synthetic_report() -> dict:
    """A full run's results: synthetic training, sampling, train_step and scaling; the committed H200 results
    of bench/kernels.py, bench/attention.py and bench/model.py; the FLOP rows with the analytic count."""
    committed = {
        name: json.loads((COMMITTED / f"{name}-nvidia-h200.json").read_text())
        for name in ("kernels", "attention", "model")
    }
    scaling = [
        {"gpus": gpus, "per_gpu_batch": 128, "global_batch": 128 * gpus, "median_ms": 190.0, "img_per_s": img_per_s,
         "mfu": 0.6, "peak_mem_gib": 40.0, "compile_s": 50.0}
        for gpus, img_per_s in ((1, 670.0), (2, 1320.0))
    ]  # fmt: skip
    return {
        "benchmark": "suite", "quick": False, "command": "python -m bench",
        "env": {"date": "2026-11-21T12:00:00+00:00", "commit": "abc1234", "python": "3.11", "torch": "2.11.0",
                "triton": "3.6.0", "cuda": "13.0", "cudnn": 91900, "gpu": "NVIDIA H200", "gpu_count": 2, "sms": 132},
        "bf16_matmul_peak_tflops": 750.0,
        "parts": {"flops": {"rows": suite.flop_rows(analytic_count)}, "training": {"rows": training_rows()},
                  "sampling": {"rows": sampling_rows()}, "train_step": train_step_report(),
                  "scaling": {"rows": scaling}, **committed},
        "skipped": {}, "errors": {}, "seconds": {"flops": 5.0, "training": 600.0}, "total_s": 605.0,
    }  # fmt: skip


def test_report_and_plots_from_a_saved_results_file(tmp_path):
    saved = tmp_path / "nvidia-h200-2026-11-21.json"
    saved.write_text(json.dumps(synthetic_report()))
    written = suite.render_saved(str(saved))
    names = sorted(os.path.basename(path) for path in written)
    plots = [f"nvidia-h200-2026-11-21-{name}.png" for name in ("kernel-bandwidth", "mfu", "speedup", "throughput")]
    assert names == sorted(["nvidia-h200-2026-11-21.json", "nvidia-h200-2026-11-21.md", *plots])
    for name in plots:
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)
        assert (tmp_path / name).stat().st_size > 10_000
    text = (tmp_path / "nvidia-h200-2026-11-21.md").read_text()
    assert "`python -m bench`" in text and "abc1234" in text and "torch 2.11.0" in text and "NVIDIA H200 x 2" in text
    for title in ["Targets (BENCHMARKS.md)", *(title for _, title, _ in suite_report.SECTIONS), "Plots"]:
        assert f"\n## {title}\n" in text
    assert "could not render" not in text and "## Errors" not in text
    for name in plots:
        assert f"![{name}]({name})" in text
    assert "| DiT-XL/2 CFG sampling step at batch 64 <= 52.0 ms | sampling | 59.6 ms | **no** |" in text
    assert "| FSDP weak scaling efficiency on 2 GPUs >= 0.95 | scaling | 0.985 | yes |" in text
    saved_again = json.loads(saved.read_text())
    assert saved_again["plots"] == [f"nvidia-h200-2026-11-21-{name}.png" for name in plots_module.PLOTS]
    assert saved_again["targets"] == suite_report.targets(saved_again)


def test_targets_show_misses_and_what_was_not_measured():
    report = json.loads(json.dumps(synthetic_report()))
    found = {t["target"]: t for t in suite_report.targets(report)}
    step = found["DiT-XL/2 CFG sampling step at batch 64 <= 52.0 ms"]
    assert step["measured"] == [59.6, 59.6] and step["met"] is False
    assert found["DiT-XL/2 sampling >= 3.5x the fp32 recipe"]["measured"][0] == pytest.approx(192.0 / 59.6)
    assert found["DiT-XL/2 training step >= 720 img/s at batch 256"]["met"] is False
    assert found["DiT-XL/2 training step >= 1.25x the original recipe"]["measured"][0] == pytest.approx(670.9 / 576)
    bandwidth = found["ln_modulate fwd >= 85% of copy bandwidth"]  # the committed H200 run: 91-97% over its shapes
    assert bandwidth["met"] is True and 85 <= bandwidth["measured"][0] < bandwidth["measured"][1]
    gated = found["gated_residual fwd+bwd >= 1.2x compiled (Inductor)"]  # committed: 1.00-1.04x
    assert gated["met"] is False and gated["measured"][0] < gated["measured"][1] < 1.2
    committed = report["parts"]["model"]["speedups"]["fwd+bwd@256"]["vs_compiled"]  # the committed H200 run
    assert found["DiT-XL/2 fwd+bwd >= 1.25x compiled reference at batch 256"]["measured"] == [committed, committed]
    del report["parts"]["model"]
    report["skipped"]["model"] = "not in --quick"
    report["targets"] = suite_report.targets(report)
    assert "| not measured: not in --quick | - |" in suite_report.targets_markdown(report)


def run_without_cuda(*args: str) -> subprocess.CompletedProcess:
    """`python ARGS` in the repository root with every GPU hidden, output captured."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_python_m_bench_without_cuda_prints_the_flop_table_and_the_gpu_note():
    result = run_without_cuda("-m", "bench")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("DiT-")]
    assert len(rows) == len(PAPER_GMACS)
    assert all(line.split()[-1] == line.split()[4] for line in rows)  # counted GMACs == analytic GMACs
    assert "timing parts" in result.stdout and "need a CUDA GPU" in result.stdout


def test_pytest_on_bench_skips_cleanly_without_cuda():
    result = run_without_cuda("-m", "pytest", "-q", "-rs", "bench/")
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" not in result.stdout and " skipped" in result.stdout and "no CUDA GPU is visible" in result.stdout
