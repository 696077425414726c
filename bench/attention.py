"""Attention backends: TFLOP/s of every available backend, fwd and fwd+bwd, bf16, at each DiT config's shape.

Shapes: the 12 paper configs at 256px (T = 256, 64, 16 tokens for patch 2, 4, 8; head dim 64 for
S/B/L, 72 for XL) plus DiT-XL/2 at 512px (T = 1024); batch = 65536 // T, about one training step.
Inputs are the strided views `qkv.unbind(2)` of a packed (B, T, 3, H, Dh) projection, as in the model.
FLOPs: 4*B*H*T^2*Dh forward, 3.5x that forward+backward (`attention_flops`). Timing is
triton.testing.do_bench's median (warm-up excluded, L2 flushed between calls). The "auto" column is
the backend `resolve_backend("auto", ...)` picks for that shape.

    python -m bench.attention [--quick] [--out bench/results/attention-<gpu>.json]
"""

import torch

from bench.environment import benchmark_main, git_commit

from dit_fast.attention import attention, attention_flops, available_backends, resolve_backend, unavailable_backends
from dit_fast.config import DIT_CONFIGS, get_config

DTYPE = torch.bfloat16
TOKENS_PER_BATCH = 65536
MODES = ("fwd", "fwd+bwd")
QUICK_SHAPES = (("DiT-B/2", 256), ("DiT-XL/2", 256), ("DiT-XL/2", 512))


def dit_shapes(quick: bool) -> list[dict]:
    """(config, image size, B, T, H, Dh) for every paper config at 256px and DiT-XL/2 at 512px."""
    if quick:
        named = QUICK_SHAPES
    else:
        named = [(name, 256) for name in DIT_CONFIGS if name != "DiT-debug"] + [("DiT-XL/2", 512)]
    shapes = []
    for name, image_size in named:
        cfg = get_config(name, image_size=image_size)
        seq_len = cfg.num_patches
        shapes.append(
            {
                "config": f"{name} {image_size}px",
                "batch": TOKENS_PER_BATCH // seq_len,
                "seq_len": seq_len,
                "num_heads": cfg.num_heads,
                "head_dim": cfg.head_dim,
            }
        )
    return shapes


def time_backend_ms(backend: str, shape: dict, mode: str, rep_ms: int) -> float:
    """Median ms of one attention call (fwd) or one call plus its backward (fwd+bwd)."""
    from triton.testing import do_bench

    batch, seq_len, heads, head_dim = shape["batch"], shape["seq_len"], shape["num_heads"], shape["head_dim"]
    training = mode == "fwd+bwd"
    qkv = torch.randn(batch, seq_len, 3, heads, head_dim, device="cuda", dtype=DTYPE, requires_grad=training)
    grad_out = torch.randn(batch, seq_len, heads, head_dim, device="cuda", dtype=DTYPE)  # (B, T, H, Dh)

    def forward():
        with torch.no_grad():
            attention(*qkv.unbind(2), backend=backend)  # (B, T, H, Dh)

    def forward_backward():
        out = attention(*qkv.unbind(2), backend=backend)  # (B, T, H, Dh)
        torch.autograd.grad(out, qkv, grad_out)  # (B, T, 3, H, Dh)

    return do_bench(forward_backward if training else forward, warmup=25, rep=rep_ms, return_mode="median")



def run(quick: bool) -> dict:
    """Benchmark every available backend at every shape; returns the JSON-ready result."""
    if not torch.cuda.is_available():
        raise RuntimeError("the attention benchmark needs a CUDA GPU; none is visible to torch")
    import triton

    rep_ms = 40 if quick else 100
    shapes, results, auto_choices = dit_shapes(quick), [], []
    for shape in shapes:
        head_dim = shape["head_dim"]
        for mode in MODES:
            auto = resolve_backend("auto", "cuda", DTYPE, head_dim, shape["seq_len"], requires_grad=mode == "fwd+bwd")
            auto_choices.append({"config": shape["config"], "mode": mode, "backend": auto})
            flops = attention_flops(
                shape["batch"], shape["seq_len"], shape["num_heads"], head_dim, backward=mode == "fwd+bwd"
            )
            for backend in available_backends("cuda", DTYPE, head_dim):
                row = {**shape, "mode": mode, "backend": backend, "flops": flops}
                try:
                    ms = time_backend_ms(backend, shape, mode, rep_ms)
                    row.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
                except Exception as error:  # one kernel refusing a shape must not end the benchmark
                    row["error"] = repr(error)
                results.append(row)
                torch.cuda.empty_cache()
    return {
        "benchmark": "attention",
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "git_commit": git_commit(),
        "dtype": str(DTYPE),
        "tokens_per_batch": TOKENS_PER_BATCH,
        "flops_formula": "4*B*H*T^2*Dh forward; 3.5x that for fwd+bwd",
        "unavailable": {
            str(head_dim): unavailable_backends("cuda", DTYPE, head_dim)
            for head_dim in sorted({shape["head_dim"] for shape in shapes})
        },
        "results": results,
        "auto": auto_choices,
    }


def markdown_tables(report: dict) -> str:
    """One table per mode: rows are configs, columns backends (TFLOP/s), plus what auto picked."""
    backends = list(dict.fromkeys(row["backend"] for row in report["results"]))
    auto = {(a["config"], a["mode"]): a["backend"] for a in report["auto"]}
    lines = [f"attention, {report['dtype']}, {report['gpu']}, torch {report['torch']}: TFLOP/s (median)"]
    for mode in MODES:
        rows = [row for row in report["results"] if row["mode"] == mode]
        configs = list(dict.fromkeys(row["config"] for row in rows))
        cells = {(row["config"], row["backend"]): row for row in rows}
        lines += ["", f"### {mode}", "", "| config | B | T | H | Dh | " + " | ".join(backends) + " | auto |"]
        lines.append("|---" * (len(backends) + 6) + "|")
        for config in configs:
            first = next(row for row in rows if row["config"] == config)
            values = []
            for backend in backends:
                row = cells.get((config, backend))
                values.append("-" if row is None else "error" if "error" in row else f"{row['tflops']:.1f}")
            shape = f"{first['batch']} | {first['seq_len']} | {first['num_heads']} | {first['head_dim']}"
            lines.append(f"| {config} | {shape} | " + " | ".join(values) + f" | {auto[(config, mode)]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    benchmark_main(argv, "attention", __doc__, f"only {', '.join(f'{n} {s}px' for n, s in QUICK_SHAPES)}", run, markdown_tables)

if __name__ == "__main__":
    main()
