"""Training and sampling throughput of the paper's 12 DiT configs at 256px: the fast path against the reference.

Training step: forward, a mean-square loss on the output (as bench/model.py), backward and a fused AdamW
step (dit_fast.train_step.make_optimizer), on fixed random latents (bench.model.make_inputs). Variants, as
bench/model.py builds them for DiT-XL/2:
  fast                fused=True, bf16 weights, auto attention, blocks compiled one by one
  reference-eager     the reference model (PyTorch SDPA), fp32 weights under bf16 autocast
  reference-compiled  the same under torch.compile (whole model, static shapes)
each at the largest batch of TRAIN_BATCHES that fits (an out-of-memory error drops to the next). The
first step's wall time (compilation included) is reported apart from the median step time (CUDA events).
TFLOP/s count the analytic model FLOPs (forward+backward = 3x the forward; the optimizer is not counted);
MFU is against the bf16 matmul peak the suite measures.

Sampling: one DDPM step with classifier-free guidance at batch 64 (128 forwards), timed by
bench.sampling.measure_steps in its configurations fp32+tf32 (the original recipe), bf16 (eager
autocast), bf16+compile and fast (fused model, CUDA graph). Images/s for 250 steps is an estimate,
64 / (250 x the step time), not a timed 250-step run.
"""

import time
from collections.abc import Callable

import torch

from bench.environment import time_ms
from bench.model import make_inputs
from bench.sampling import CONFIGS, TIMED_STEPS, batch_inputs, measure_steps
from dit_fast.config import DIT_CONFIGS, get_config
from dit_fast.flops import model_flops
from dit_fast.model import DiT, create_model
from dit_fast.train_step import make_optimizer

PAPER_MODELS = tuple(name for name in DIT_CONFIGS if name != "DiT-debug")
QUICK_MODELS = ("DiT-S/2", "DiT-XL/2")
TRAIN_VARIANTS = ("fast", "reference-eager", "reference-compiled")
QUICK_TRAIN_VARIANTS = ("fast", "reference-eager")  # --quick: no Inductor compile of the reference (~1 min each)
TRAIN_BATCHES = (256, 128, 64)  # largest first
QUICK_TRAIN_BATCHES = (64,)
SAMPLING_CONFIGS = ("fp32+tf32", "bf16", "bf16+compile", "fast")  # names in bench.sampling.CONFIGS
QUICK_SAMPLING_CONFIGS = ("bf16", "fast")
QUICK_TIMED_STEPS = 10
LEARNING_RATE = 1e-4


def forward_gflops_per_image(name: str) -> float:
    return model_flops(get_config(name)) / 1e9


def build_for_training(name: str, variant: str) -> tuple[DiT, Callable, torch.dtype | None]:
    """(model, callable to run, autocast dtype or None) of one training variant, on the GPU."""
    if variant not in TRAIN_VARIANTS:
        raise ValueError(f"unknown training variant {variant!r}; choose one of {', '.join(TRAIN_VARIANTS)}")
    with torch.device("cuda"):
        if variant == "fast":
            model = create_model(name, fused=True, attn="auto").to(torch.bfloat16)
            model.compile_blocks(dynamic=False)
            return model, model, None
        model = create_model(name, attn="sdpa")  # fp32 weights
    run = torch.compile(model, dynamic=False) if variant == "reference-compiled" else model
    return model, run, torch.bfloat16


def training_step(
    run: Callable, autocast: torch.dtype | None, inputs: tuple, optimizer: torch.optim.Optimizer
) -> Callable[[], None]:
    """One forward, mean-square loss, backward and optimizer step on fixed inputs."""

    def step() -> None:
        with torch.autocast("cuda", dtype=autocast, enabled=autocast is not None):
            out = run(*inputs)  # (N, C_out, H, W)
        out.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_training(
    model: DiT, step: Callable[[], None], batch: int, peak_tflops: float, warmup: int, iters: int
) -> dict:
    """First-step wall time (compilation), then the median step time and what follows from it."""
    torch.cuda.synchronize()
    began = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first_step_s = time.perf_counter() - began
    torch.cuda.reset_peak_memory_stats()
    ms = time_ms(step, warmup=warmup, iters=iters)
    tflops = model_flops(model.cfg, batch_size=batch, train=True) / ms / 1e9
    return {
        "batch": batch, "ms": round(ms, 2), "img_per_s": round(batch / ms * 1000, 1), "tflops": round(tflops, 1),
        "mfu": round(tflops / peak_tflops, 4), "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "first_step_s": round(first_step_s, 1),
    }  # fmt: skip


def measure_training(name: str, variant: str, quick: bool, peak_tflops: float) -> dict:
    """Training throughput of one config and variant at the largest batch that fits."""
    model, run, autocast = build_for_training(name, variant)
    optimizer = make_optimizer("adamw", [p for p in model.parameters() if p.requires_grad], LEARNING_RATE)
    warmup, iters = (2, 5) if quick else (3, 10)
    out_of_memory_at = []
    for batch in QUICK_TRAIN_BATCHES if quick else TRAIN_BATCHES:
        try:
            step = training_step(run, autocast, make_inputs(batch), optimizer)
            timing = time_training(model, step, batch, peak_tflops, warmup, iters)
            break
        except torch.cuda.OutOfMemoryError:
            out_of_memory_at.append(batch)
        optimizer.zero_grad(set_to_none=True)  # the failed attempt's gradients, then its cached blocks
        torch.cuda.empty_cache()
    else:
        raise RuntimeError(f"{name} {variant}: out of memory at every batch size tried, {out_of_memory_at}")
    return {
        "model": name, "variant": variant, "forward_gflops_per_image": round(forward_gflops_per_image(name), 3),
        **timing, "out_of_memory_at": out_of_memory_at,
    }  # fmt: skip


def sampling_model(name: str, fused: bool) -> DiT:
    """The reference (fp32 weights, PyTorch SDPA) or the fast path (bf16 weights, auto attention), for inference."""
    with torch.device("cuda"):
        model = create_model(name, fused=fused, attn="auto" if fused else "sdpa")
    return model.to(torch.bfloat16 if fused else torch.float32).eval().requires_grad_(False)


def measure_sampling(name: str, config: str, quick: bool, peak_tflops: float) -> dict:
    """One sampling configuration of bench.sampling on one model: CFG step time at batch 64."""
    fused = CONFIGS[config][0]
    timed_steps = QUICK_TIMED_STEPS if quick else TIMED_STEPS
    row = measure_steps(config, sampling_model(name, fused), batch_inputs(), timed_steps, peak_tflops)
    return {
        "model": name, "forward_gflops_per_image": round(forward_gflops_per_image(name), 3), **row,
        "cfg_steps_per_s": round(1000 / row["step_ms"], 2),
    }  # fmt: skip


def ratio(numerator: float | None, denominator: float | None) -> str:
    return f"{numerator / denominator:.2f}" if numerator and denominator else "-"


def training_markdown(part: dict) -> str:
    """One row per (model, variant); speed-ups are img/s over the same model's reference img/s."""
    rows = part["rows"]
    img_per_s = {(r["model"], r["variant"]): r["img_per_s"] for r in rows}
    lines = [
        "Forward + mean-square loss + backward + fused AdamW step, 256px, each variant at the largest batch of "
        f"{', '.join(map(str, TRAIN_BATCHES))} that fits; first step (compilation) apart from the median step.",
        "",
        "| model | GFLOPs/img (fwd) | variant | batch | ms/step | img/s | TFLOP/s | MFU | peak GiB | first step s "
        "| x compiled | x eager |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        model = r["model"]
        lines.append(
            f"| {model} | {r['forward_gflops_per_image']:.2f} | {r['variant']} | {r['batch']} | {r['ms']} | "
            f"{r['img_per_s']} | {r['tflops']} | {r['mfu']:.1%} | {r['peak_mem_gib']} | {r['first_step_s']} | "
            f"{ratio(r['img_per_s'], img_per_s.get((model, 'reference-compiled')))} | "
            f"{ratio(r['img_per_s'], img_per_s.get((model, 'reference-eager')))} |"
        )
    return "\n".join(lines)


def sampling_markdown(part: dict) -> str:
    """One row per (model, configuration); speed-ups are step-time ratios within the same model."""
    rows = part["rows"]
    step_ms = {(r["model"], r["config"]): r["step_ms"] for r in rows}
    lines = [
        "DDPM step with classifier-free guidance, batch 64 (128 forwards), 256px; img/s for 250 steps is "
        "estimated as 64 / (250 x step time); setup (compilation, graph capture) apart.",
        "",
        "| model | GFLOPs/img (fwd) | config | ms/step | CFG steps/s | img/s (250 steps, est.) | TFLOP/s | MFU "
        "| setup s | peak GiB | x compiled | x fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        model = r["model"]
        lines.append(
            f"| {model} | {r['forward_gflops_per_image']:.2f} | {r['config']} | {r['step_ms']} | "
            f"{r['cfg_steps_per_s']} | {r['img_per_s_250_steps']} | {r['tflops']} | {r['mfu']:.1%} | "
            f"{r['setup_s']} | {r['peak_mem_gib']} | {ratio(step_ms.get((model, 'bf16+compile')), r['step_ms'])} | "
            f"{ratio(step_ms.get((model, 'fp32+tf32')), r['step_ms'])} |"
        )
    return "\n".join(lines)
