"""The fast DiT against the reference, same run: DiT-XL/2 256px forward+backward (no optimizer) and forward.

Variants: the reference eager under bf16 autocast (fp32 weights, PyTorch's SDPA as the original code
used through timm), the same under torch.compile (the whole model, static shapes), and the fast model
(bf16 weights, Triton ops, auto attention, blocks compiled one at a time; for the forward also without
compiling, as sample.py runs it). Reports ms, img/s, achieved TFLOP/s (analytic model FLOPs: forward
2*MACs, forward+backward 3x that), MFU against a bf16 matmul peak measured in the same run, peak memory,
and a GPU-time profile split by GEMM / attention / elementwise+norm / other.

ms is the median of calls launched back to back (a training or sampling loop's rate); ms_synced, the
median of calls each followed by a host sync, adds the host's launch latency once per call (the figure
this script reported before session 8).

    python -m bench.model [--quick] [--out PATH]
"""
import statistics
import time
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from bench.environment import back_to_back_ms, benchmark_main, environment, matmul_peak_tflops, require_cuda, time_ms
from dit_fast.flops import model_flops
from dit_fast.fused_blocks import FusedMlp
from dit_fast.model import DiT, create_model

MODEL = "DiT-XL/2"
KERNEL_CATEGORIES = (  # first match wins; names as CUDA kernels appear in the profiler
    ("attention", ("fmha", "flash", "attn", "sdpa", "cudnn")),
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "matmul", "sm90_")),
    ("elementwise+norm", ("triton", "ln_modulate", "gated_residual", "final_layer", "elementwise", "norm",
                          "reduce", "gelu", "vectorized", "softmax", "silu")),
)


def build(variant: str) -> tuple[DiT, Callable, torch.dtype | None]:
    """(model, forward wrapper, autocast dtype) for a variant name."""
    if variant.startswith("reference"):
        model = create_model(MODEL, attn="sdpa").cuda()
        run = torch.compile(model, dynamic=False) if variant == "reference-compiled" else model
        return model, run, torch.bfloat16
    model = create_model(MODEL, fused=True, attn="auto").cuda().to(torch.bfloat16)
    if variant == "fast":
        model.compile_blocks(dynamic=False)
    return model, model, None


def make_inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(batch, 4, 32, 32, device="cuda")
    t = torch.randint(0, 1000, (batch,), device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    return x, t, y


def step_fn(model: DiT, run: Callable, autocast: torch.dtype | None, inputs: tuple, backward: bool) -> Callable:
    """One forward(+backward with a mean-square loss) on fixed inputs."""

    def step():
        with torch.autocast("cuda", dtype=autocast, enabled=autocast is not None):
            if not backward:
                with torch.no_grad():
                    return run(*inputs)
            out = run(*inputs)
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    return step


def kernel_profile(step: Callable, iters: int = 2, top: int = 25) -> dict:
    """GPU time per step by kernel category, and the costliest kernels, from the profiler's self times."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    split = {name: 0.0 for name, _ in KERNEL_CATEGORIES} | {"other": 0.0}
    kernels = []
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if us <= 0 or event.key.startswith("ProfilerStep"):
            continue
        name = event.key.lower()
        category = next((c for c, keys in KERNEL_CATEGORIES if any(k in name for k in keys)), "other")
        split[category] += us / 1000 / iters
        kernels.append((us / 1000 / iters, event.count // iters, category, event.key[:120]))
    kernels.sort(reverse=True)
    return {"split_ms": {k: round(v, 2) for k, v in split.items()},
            "top_kernels": [{"ms": round(ms, 3), "calls": n, "category": c, "name": k} for ms, n, c, k in kernels[:top]]}


def measure(variant: str, model, run, autocast, batch: int, backward: bool, peak: float, profile_it: bool) -> dict:
    step = step_fn(model, run, autocast, make_inputs(batch), backward)
    start = time.time()
    step()
    torch.cuda.synchronize()
    first_call_s = time.time() - start  # includes compilation for compiled variants
    torch.cuda.reset_peak_memory_stats()
    ms = statistics.median(back_to_back_ms(step, iters=8, warmup=2))
    flops = model_flops(model.cfg, batch_size=batch, train=backward)
    row = {
        "variant": variant, "batch": batch, "pass": "fwd+bwd" if backward else "fwd", "ms": round(ms, 2),
        "ms_synced": round(time_ms(step, warmup=0, iters=8), 2),
        "img_per_s": round(batch / ms * 1000, 1), "tflops": round(flops / ms / 1e9, 1),
        "mfu": round(flops / ms / 1e9 / peak, 4), "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "first_call_s": round(first_call_s, 1),
    }
    if profile_it:
        row.update(kernel_profile(step))
    print({k: v for k, v in row.items() if k != "top_kernels"}, flush=True)
    return row


def run(quick: bool = False) -> dict:
    require_cuda("bench/model.py")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    peak = matmul_peak_tflops()
    train_batches = [128] if quick else [128, 256]
    rows = []
    for variant in ("reference-eager", "reference-compiled", "fast"):
        model, fn, autocast = build(variant)
        for batch in train_batches:
            rows.append(measure(variant, model, fn, autocast, batch, True, peak, profile_it=batch == 128))
        rows.append(measure(variant, model, fn, autocast, 128, False, peak, profile_it=True))
        if variant == "fast":  # the MLP's bias + GELU by the bias_gelu Triton op instead of the cuBLASLt epilogue
            for module in model.modules():
                if isinstance(module, FusedMlp):
                    module.gelu_epilogue = False
            rows.append(measure("fast-bias-gelu-kernel", model, fn, autocast, 128, False, peak, profile_it=False))
        del model, fn
        torch.cuda.empty_cache()
    model, fn, autocast = build("fast-uncompiled")
    rows.append(measure("fast-uncompiled", model, fn, autocast, 128, False, peak, profile_it=False))
    del model, fn
    torch.cuda.empty_cache()
    return {"benchmark": "model", "model": MODEL, "image_size": 256, "env": environment(),
            "bf16_matmul_peak_tflops": round(peak, 1), "rows": rows, "speedups": speedups(rows)}


def speedups(rows: list[dict]) -> dict:
    """Fast against compiled reference and against eager reference, per (pass, batch)."""
    by_key = {(r["variant"], r["pass"], r["batch"]): r["ms"] for r in rows}
    out = {}
    for (variant, pas, batch), ms in by_key.items():
        if variant in ("fast", "fast-uncompiled"):
            out[f"{pas}@{batch}" + (" uncompiled" if variant == "fast-uncompiled" else "")] = {
                "vs_compiled": round(by_key[("reference-compiled", pas, batch)] / ms, 3),
                "vs_eager": round(by_key[("reference-eager", pas, batch)] / ms, 3),
            }
    return out


def markdown(report: dict) -> str:
    lines = [f"bf16 matmul peak (8192^3, same run): {report['bf16_matmul_peak_tflops']} TFLOP/s", "",
             "| variant | pass | batch | ms | ms, host sync per call | img/s | TFLOP/s | MFU | peak GiB | GEMM | attn "
             "| elem+norm | other |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        s = r.get("split_ms", {})
        lines.append(
            f"| {r['variant']} | {r['pass']} | {r['batch']} | {r['ms']} | {r.get('ms_synced', '')} | "
            f"{r['img_per_s']} | {r['tflops']} | {r['mfu']:.1%} | {r['peak_mem_gib']} | {s.get('gemm', '')} | "
            f"{s.get('attention', '')} | {s.get('elementwise+norm', '')} | {s.get('other', '')} |"
        )
    lines += ["", "| pass@batch | fast vs compiled reference | fast vs eager reference |", "|---|---|---|"]
    lines += [f"| {k} | {v['vs_compiled']}x | {v['vs_eager']}x |" for k, v in report["speedups"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    benchmark_main(argv, "model", __doc__, "batch 128 only", run, markdown)

if __name__ == "__main__":
    main()
