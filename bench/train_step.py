"""A full DiT-XL/2 training step (forward, loss, backward, optimizer, EMA) at 256px: dit_fast against the
original recipe, in the same run.

dit_fast: the step train.py runs (dit_fast.train_step.TrainStep): FSDP2 (one rank here), bf16 compute with fp32
master weights, the fused Triton path with auto attention, blocks compiled one by one, fused AdamW, the
sharded EMA's foreach lerp, the loop's per-step randomness, and the one all-reduce of [loss, grad
norm], whose finiteness is checked on the device (finite_check "device": what train.py does; nothing is
read back). At the first batch also with the record read back every step ("host": train.py's former
per-step sync), to measure what that sync cost.
Original recipe: the reference model (attn="sdpa") with fp32 weights under bf16 autocast and
torch.compile (whole model, static shapes), foreach AdamW, and a per-parameter EMA loop.

Each configuration: the first step's wall time is reported as compile time; WARMUP more steps are
excluded; then the median of STEPS steps timed with CUDA events. MFU is against an 8192^3 bf16 matmul
measured in the same run. Under torchrun (weak scaling, --per-gpu-batch per rank) only dit_fast runs and
img/s is global:

    python -m bench.train_step [--quick] [--out PATH]
    torchrun --nproc_per_node=4 -m bench.train_step --per-gpu-batch 128 --out PATH
"""

import argparse
import copy
import gc
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from bench.environment import (
    back_to_back_ms, environment, kernel_time_ms, matmul_peak_tflops, require_cuda, save_report,
)
from bench.model import kernel_profile
from dit_fast.config import get_config
from dit_fast.diffusion import create_diffusion
from dit_fast.ema import DEFAULT_DECAY, ShardedEMA
from dit_fast.flops import train_flops_per_image
from dit_fast.model import create_model
from dit_fast.parallel import FSDP_UNITS, DistEnv, build_fsdp_model, distributed, fsdp_units
from dit_fast.train_data import draw_step_randomness
from dit_fast.train_step import TrainStep, make_optimizer

MODEL = "DiT-XL/2"
IMAGE_SIZE = 256
LR = 1e-4
WARMUP = 5
STEPS = 20
ORIGINAL_RECIPE_IMG_PER_S = {128: 532, 256: 576}  # measured on an H200 (DESIGN.md section 2)
TARGET_IMG_PER_S = 720  # 1x H200, batch 256
TARGET_SPEEDUP = 1.25
TARGET_WEAK_SCALING = 0.95


def time_steps(step: Callable[[], None], steps: int, warmup: int) -> tuple[float, list[float]]:
    """(seconds of the first call, which compiles; per-step ms of `steps` calls after `warmup` more)."""
    torch.cuda.synchronize()
    began = time.perf_counter()
    step()
    torch.cuda.synchronize()
    return time.perf_counter() - began, back_to_back_ms(step, steps, warmup)


def row(
    impl: str, batch: int, env: DistEnv, first_s: float, step_ms: list[float], peak: float, flops: int, **extra
) -> dict:
    """One result: the slowest rank's median step time sets the global rate."""
    median = torch.tensor(statistics.median(step_ms), device=env.device)
    dist.all_reduce(median, op=dist.ReduceOp.MAX)
    ms = median.item()
    images_per_s = batch * env.world_size / ms * 1e3
    tflops = batch * flops / ms / 1e9  # per GPU
    result = {
        "impl": impl, "per_gpu_batch": batch, "global_batch": batch * env.world_size, "world_size": env.world_size,
        "median_ms": round(ms, 2), "min_ms": round(min(step_ms), 2), "img_per_s": round(images_per_s, 1),
        "tflops_per_gpu": round(tflops, 1), "mfu": round(tflops / peak, 4),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(env.device) / 2**30, 2), "compile_s": round(first_s, 1),
        **extra,
    }  # fmt: skip
    if env.is_main:
        print(result, flush=True)
    return result


def dit_fast_step(trainer: TrainStep, env: DistEnv, batch: int, read_every_step: bool) -> Callable[[], None]:
    """train.py's step on fixed latents: the step's random draws, gradients, update (finite check on the device),
    and with read_every_step the host read of the check's record."""
    cfg = trainer.model.cfg
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=env.device)  # (n, C, h, w)
    y = torch.randint(0, cfg.num_classes, (batch,), device=env.device)  # (n,)
    steps_done = iter(range(10**9))

    def step() -> None:
        step_number = next(steps_done)
        draws = draw_step_randomness(
            0, step_number, batch * env.world_size, x.shape[1:], 1000, trainer.label_dropout, env
        )
        stats = trainer.gradients(x, y, draws.t, draws.noise, draws.drop_label)
        trainer.update(stats, step_number + 1)
        if read_every_step and trainer.first_non_finite() is not None:
            raise RuntimeError("non-finite loss in the benchmark")

    return step


def bench_dit_fast(
    env: DistEnv,
    batches: list[int],
    peak: float,
    flops: int,
    steps: int,
    warmup: int,
    profile_first: bool = False,
    units: str = "auto",
) -> list[dict]:
    """Every batch as train.py runs it (FSDP `units`, dit_fast.parallel); the first batch also with a host read
    every step. With profile_first, the first row also gets bench.model's GPU-time split and costliest kernels
    of one step."""
    model = build_fsdp_model(
        MODEL, env, seed=0, image_size=IMAGE_SIZE, attn="auto", fused=True, compile_blocks=True, units=units
    )
    resolved_units = fsdp_units(units, env.world_size, grad_ckpt=False)
    optimizer = make_optimizer("adamw", [p for p in model.parameters() if p.requires_grad], LR)
    trainer = TrainStep(model, create_diffusion(""), optimizer, ShardedEMA(model, DEFAULT_DECAY))
    results = []
    for batch in batches:
        checks = ("device", "host") if batch == batches[0] else ("device",)
        for check in checks:
            torch.cuda.reset_peak_memory_stats(env.device)
            step = dit_fast_step(trainer, env, batch, read_every_step=check == "host")
            first_s, step_ms = time_steps(step, steps, warmup)
            extra = {"finite_check": check, "fsdp_units": resolved_units}
            results.append(row("dit_fast", batch, env, first_s, step_ms, peak, flops, **extra))
            if profile_first and len(results) == 1:
                results[0].update(kernel_profile(step, iters=2, top=40))
    if env.world_size == 1:
        results[0]["ema_update_gpu_ms"] = ema_update_cost(trainer.ema)
    return results


def ema_update_cost(ema: ShardedEMA) -> dict:
    """GPU ms of one EMA update: the plain foreach lerp against the skippable one (a () device weight per
    shard, which takes torch's per-tensor path) that TrainStep runs."""
    active = torch.ones((), device=ema.shadow[0].device)
    return {
        "scalar_weight": round(kernel_time_ms(ema.update), 3),
        "device_weight": round(kernel_time_ms(lambda: ema.update(active=active)), 3),
    }


class OriginalRecipe:
    """The original training step: fp32 reference model under bf16 autocast + torch.compile, foreach AdamW,
    and a per-parameter EMA loop."""

    def __init__(self, env: DistEnv):
        self.model = create_model(MODEL, image_size=IMAGE_SIZE, attn="sdpa").to(env.device)  # fp32 weights
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.compiled = torch.compile(self.model, dynamic=False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=0.0)  # foreach on CUDA
        self.diffusion = create_diffusion("")
        self.pairs = list(zip(self.ema.parameters(), self.model.parameters()))
        self.device = env.device

    def step_on(self, batch: int) -> Callable[[], None]:
        cfg = self.model.cfg
        x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=self.device)  # (n, C, h, w)
        y = torch.randint(0, cfg.num_classes, (batch,), device=self.device)  # (n,)

        def step() -> None:
            t = torch.randint(0, self.diffusion.num_timesteps, (batch,), device=self.device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = self.diffusion.training_losses(self.compiled, x, t, {"y": y})["loss"].mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            with torch.no_grad():
                for shadow, param in self.pairs:
                    shadow.mul_(DEFAULT_DECAY).add_(param, alpha=1 - DEFAULT_DECAY)

        return step


def bench_original(env: DistEnv, batches: list[int], peak: float, flops: int, steps: int, warmup: int) -> list[dict]:
    recipe = OriginalRecipe(env)
    results = []
    for batch in batches:
        torch.cuda.reset_peak_memory_stats(env.device)
        first_s, step_ms = time_steps(recipe.step_on(batch), steps, warmup)
        results.append(row("original", batch, env, first_s, step_ms, peak, flops, finite_check="none"))
    return results


def release_memory() -> None:
    """Drop compiled graphs (they hold the models), collect cycles, free cached blocks: the next model's memory."""
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def summary(results: list[dict], world_size: int) -> dict:
    """Speed-ups against the original recipe at each batch, and the targets, for one GPU."""
    ours = {r["per_gpu_batch"]: r for r in results if r["impl"] == "dit_fast" and r["finite_check"] == "device"}
    original = {r["per_gpu_batch"]: r for r in results if r["impl"] == "original"}
    host_read = {r["per_gpu_batch"]: r for r in results if r["impl"] == "dit_fast" and r["finite_check"] == "host"}
    out = {
        "speedup_vs_original": {
            b: round(ours[b]["img_per_s"] / original[b]["img_per_s"], 3) for b in ours if b in original
        },
        "per_step_host_read_cost_pct": {
            b: round(100 * (host_read[b]["median_ms"] / ours[b]["median_ms"] - 1), 2) for b in ours if b in host_read
        },
    }
    if world_size == 1 and 256 in ours:
        out["target_img_per_s_256"] = {"target": TARGET_IMG_PER_S, "met": ours[256]["img_per_s"] >= TARGET_IMG_PER_S}
        if 256 in original:
            speedup = out["speedup_vs_original"][256]
            out["target_speedup_256"] = {"target": TARGET_SPEEDUP, "met": speedup >= TARGET_SPEEDUP}
    return out


def run(quick: bool = False, per_gpu_batches: list[int] | None = None, only_dit_fast: bool = False,
        steps: int = STEPS, warmup: int = WARMUP, profile: bool = False,
        units: tuple[str, ...] = ("auto",)) -> dict:  # fmt: skip
    """Benchmark on this process's GPU (all ranks under torchrun); returns the JSON-ready report. dit_fast runs
    once per FSDP `units` choice, in order; the summary compares the first with the original recipe."""
    require_cuda("bench/train_step.py")
    with distributed() as env:
        batches = per_gpu_batches or ([256] if quick else [256, 128])
        peak = matmul_peak_tflops()
        flops = train_flops_per_image(get_config(MODEL, image_size=IMAGE_SIZE))
        results = []
        for choice in units:
            results += bench_dit_fast(env, batches, peak, flops, steps, warmup, profile_first=profile, units=choice)
            release_memory()
        first_units = results[0]["fsdp_units"]
        if env.world_size == 1 and not only_dit_fast:
            results += bench_original(env, batches, peak, flops, steps, warmup)
            release_memory()
        return {
            "benchmark": "train_step", "model": MODEL, "image_size": IMAGE_SIZE, "env": environment(),
            "world_size": env.world_size, "dtype": "bf16 compute, fp32 master weights / reduction / EMA",
            "latent_shape": [4, IMAGE_SIZE // 8, IMAGE_SIZE // 8], "train_gflops_per_image": round(flops / 1e9, 1),
            "bf16_matmul_peak_tflops": round(peak, 1), "timing": f"median of {steps} steps (CUDA events) after "
            f"{1 + warmup} warm-up steps; compile_s is the first step's wall time",
            "original_recipe_reference_img_per_s": ORIGINAL_RECIPE_IMG_PER_S, "results": results,
            "summary": summary([r for r in results if r.get("fsdp_units", first_units) == first_units],
                               env.world_size),
        }  # fmt: skip


def check_label(finite_check: str | bool) -> str:
    """Results before the device-side check hold a bool: True was the per-step host read, False none."""
    return {True: "host", False: "none"}.get(finite_check, finite_check)


def markdown(report: dict) -> str:
    lines = [
        (
            f"{report['model']} {report['image_size']}px training step, {report['env'].get('gpu')} x "
            f"{report['world_size']}, bf16 matmul peak {report['bf16_matmul_peak_tflops']} TFLOP/s (same run)"
        ),
        "",
        "| impl | FSDP units | GPUs | batch/GPU | finite check | median ms | img/s | TFLOP/s/GPU | MFU | peak GiB "
        "| compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in report["results"]:
        lines.append(
            f"| {r['impl']} | {r.get('fsdp_units', '-')} | {r['world_size']} | {r['per_gpu_batch']} | "
            f"{check_label(r['finite_check'])} | "
            f"{r['median_ms']} | {r['img_per_s']} | {r['tflops_per_gpu']} | {r['mfu']:.1%} | {r['peak_mem_gib']} | "
            f"{r['compile_s']} |"
        )
    lines += ["", f"summary: {report['summary']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 256 only")
    parser.add_argument(
        "--per-gpu-batch", type=int, nargs="+", default=None, help="batch sizes per GPU (default 256 128)"
    )
    parser.add_argument("--only-dit-fast", action="store_true", help="skip the original recipe")
    parser.add_argument("--steps", type=int, default=STEPS, help="timed steps per configuration")
    parser.add_argument("--profile", action="store_true", help="GPU-time split and top kernels of dit_fast's first row")
    parser.add_argument(
        "--fsdp-units", choices=FSDP_UNITS, nargs="+", default=["auto"],
        help="dit_fast's FSDP units, one run each in this order (default: auto, what train.py does)",
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/train_step-<gpu>.json)")
    args = parser.parse_args(argv)
    require_cuda("bench/train_step.py")
    report = run(args.quick, args.per_gpu_batch, args.only_dit_fast, args.steps, profile=args.profile,
                 units=tuple(args.fsdp_units))
    if int(os.environ.get("RANK", "0")) == 0:
        name = "train_step" if report["world_size"] == 1 else f"train_step-x{report['world_size']}"
        print(markdown(report))
        print("wrote", save_report(report, name, args.out))


if __name__ == "__main__":
    main()
